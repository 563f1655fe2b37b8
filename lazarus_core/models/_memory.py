"""Keeps resident memory bounded while experts stream: when the process's RSS has grown by more than a
budget since the stream began, freed C-heap pages go back to the OS (glibc ``malloc_trim``).

Why: glibc keeps freed multi-MB blocks; measured here, streaming 32 gpt-oss experts held about 6 decoded
experts' worth of freed memory. Trimming after every expert bounds that but page-faults every new expert
(3x slower); trimming only past the budget keeps the common case (a freed expert's memory reused for the
next one) fast.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only; musl has none
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_STATM: dict[int, int] = {}  # pid -> open descriptor of /proc/self/statm (a forked child opens its own)


def resident_bytes() -> int | None:
    """Current resident set size of this process (Linux ``/proc/self/statm``), or None elsewhere.

    The file stays open and is re-read with ``pread`` (2 us here, against 26 us to open, read and close it:
    the memory guard calls this once per streamed row chunk)."""
    try:
        fd = _STATM.get(os.getpid())
        if fd is None:
            fd = _STATM[os.getpid()] = os.open("/proc/self/statm", os.O_RDONLY)
        return int(os.pread(fd, 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (or no pread): not Linux
        return None


class ResidentBudget:
    """Trims the C heap whenever RSS exceeds ``baseline + budget_bytes`` (baseline: RSS at creation).

    ``trim_first=True`` trims once before taking the baseline, so freed memory an earlier stream left
    resident is not counted as this stream's baseline (streams started one after another cannot drift up).
    """

    def __init__(self, budget_bytes: int, *, trim_first: bool = False):
        self.budget_bytes = budget_bytes
        trim = _malloc_trim()
        if trim_first and trim is not None:
            trim(0)
        self.baseline = resident_bytes()

    def enforce(self) -> None:
        """Give freed heap pages back to the OS if resident memory is over budget; cheap otherwise."""
        trim = _malloc_trim()
        if trim is None or self.baseline is None:
            return
        rss = resident_bytes()
        if rss is not None and rss > self.baseline + self.budget_bytes:
            trim(0)
