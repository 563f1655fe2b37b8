"""Resident-memory probes for the streaming tests (Linux: /proc/self/status VmRSS and VmHWM)."""

from pathlib import Path

import pytest


def status_mb(key: str) -> float:
    """``VmRSS``, ``VmHWM``, ... of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak() -> float:
    """Reset the peak (VmHWM) to the current RSS and return that RSS in MiB; skips if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset VmHWM here")
    return status_mb("VmRSS")
