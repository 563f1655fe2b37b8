"""The routing-trace file format on disk: names, dtypes, and a safetensors header reader that memory-maps."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from lazarus_core.atomic_io import atomic_write_bytes, atomic_write_json  # noqa: F401  (the trace writer's names)

FORMAT_NAME = "lazarus-routing-trace"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "trace.json"
SHARD_PATTERN = "trace-{:05d}.safetensors"

# BF16 has no numpy dtype: it is mapped as its raw uint16 bits (see bf16_bits_to_float32).
_ST_DTYPES = {"I32": np.int32, "I64": np.int64, "I16": np.int16, "F16": np.float16, "F32": np.float32,
              "BF16": np.uint16, "U8": np.uint8}
ACTIVATION_FIELDS = ("hidden", "expert_outputs", "all_expert_outputs")
ACTIVATION_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 values held as their uint16 bit patterns to float32 (exact).

    Parameters
    ----------
    bits : np.ndarray
        uint16 [...], bfloat16 bit patterns.

    Returns
    -------
    np.ndarray
        float32 [...], same shape.
    """
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
_MAX_HEADER = 100 * 1024 * 1024


class TraceError(ValueError):
    """A trace directory or shard is missing, corrupt or inconsistent; the message names the file."""


def layer_key(layer: int, field: str) -> str:
    """Tensor name of one per-layer field, e.g. ``layers.3.topk_ids``."""
    return f"layers.{layer}.{field}"


def mmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file as a read-only numpy array.

    The header is validated before any data is touched: its length, that every tensor's byte range
    lies inside the file and matches its shape and dtype.

    Parameters
    ----------
    path : Path
        A ``.safetensors`` file.

    Returns
    -------
    dict[str, np.ndarray]
        Tensor name -> read-only ``np.memmap`` view (no data is read until used); a BF16 tensor is
        a uint16 view of its bits (``trace.json``'s ``activations.dtype`` says when activations are bf16).

    Raises
    ------
    TraceError
        The file is missing, truncated, or its header is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace shard {path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise TraceError(f"trace shard {path} is corrupt: shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER, size - 8):
            raise TraceError(f"trace shard {path} is corrupt: header length {header_len} exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceError(f"trace shard {path} is corrupt: unreadable header ({exc})") from None
    data_start = 8 + header_len
    whole = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else None  # one map per file
    arrays: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TraceError(f"trace shard {path} is corrupt: bad header entry for {name!r}") from None
        if dtype is None:
            raise TraceError(f"trace shard {path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        if begin > end or any(s < 0 for s in shape):
            raise TraceError(f"trace shard {path} is corrupt: bad shape or offsets for {name!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if begin < 0 or end - begin != nbytes or data_start + end > size:
            raise TraceError(f"trace shard {path} is corrupt or truncated: tensor {name!r} needs bytes "
                             f"{begin}..{end} of the data section, file has {size - data_start}")
        if nbytes == 0:
            arrays[name] = np.empty(shape, dtype=dtype)
        else:
            arrays[name] = whole[data_start + begin: data_start + end].view(dtype).reshape(shape)
    return arrays
