"""Shared CLI helpers: atomic, strict JSON output (undefined numbers are written as null)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lazarus_core.atomic_io import atomic_write_json


def strict_json(value: Any) -> Any:
    """``value`` with every NaN / +-inf float replaced by None (JSON ``null``), numpy scalars made Python.

    Strict JSON has no NaN or Infinity; an undefined statistic (e.g. the mean weight of an expert that
    was never chosen) is ``null`` in every ``-o`` file, so any JSON parser reads it.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):   # numpy arrays and scalars
        return strict_json(value.tolist())
    return value


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented strict JSON to ``path`` atomically
    (:func:`lazarus_core.atomic_io.atomic_write_json`: unique temporary name, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, strict_json(payload), allow_nan=False)
    return path
