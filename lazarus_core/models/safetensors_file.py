"""A bounded, validating safetensors reader: header checked before any data is read, tensors (or one
leading-index row of a fused tensor) read with positioned reads into fresh buffers, never mmapped,
so resident memory holds only what the caller keeps.

Why not ``safetensors.safe_open``: its mmap keeps every page touched resident (file-backed RSS grows
with each expert streamed), and its header errors do not say which tensor is at fault.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lazarus_core.models.errors import CheckpointError

# safetensors dtype string -> (torch dtype used to view the bytes, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.uint8, 1),  # raw E4M3FN bits; decoded by ops.fp8_dequant
    "F8_E5M2": (torch.uint8, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry, validated against the file size.

    Attributes
    ----------
    name : str
    dtype : str
        safetensors dtype string (``"BF16"``, ``"F8_E4M3"``, ``"U8"``...).
    shape : tuple of int
    start : int
        Absolute byte offset of the data in the file.
    nbytes : int
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "start": self.start,
                "nbytes": self.nbytes}


class SafetensorsFile:
    """Header-validated read access to one ``.safetensors`` file.

    Parameters
    ----------
    path : str or Path
        The file. Its header is read and validated at construction; data is read on demand.

    Raises
    ------
    CheckpointError
        Missing file, header length beyond the file or the 100 MiB limit, malformed JSON, an unknown
        dtype, a negative or non-integer shape, data offsets that disagree with the shape or run past
        the end of the file (a truncated file), or tensors that do not tile the data section exactly as the
        safetensors library requires (overlapping offsets, a gap between tensors, trailing bytes). The
        message names the file and, where one is at fault, the tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: safetensors file not found") from None
        try:
            self.size = os.fstat(self._fd).st_size
            self.tensors, self.metadata = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        if self.size < 8:
            raise CheckpointError(f"{self.path}: not a safetensors file ({self.size} bytes, truncated or empty)")
        (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > self.size:
            raise CheckpointError(
                f"{self.path}: corrupt or truncated safetensors header (declares {header_len} header bytes, "
                f"file has {self.size})"
            )
        raw = os.pread(self._fd, header_len, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON: {exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        tensors = {}
        for name, entry in header.items():
            tensors[name] = self._validate_entry(name, entry, data_start)
        self._check_coverage(tensors, data_start)
        return tensors, metadata if isinstance(metadata, dict) else {}

    def _check_coverage(self, tensors: dict[str, TensorInfo], data_start: int) -> None:
        """The safetensors library's rule: sorted by offsets, the tensors tile the data section exactly
        (the first starts at 0, each starts where the previous ended, the last ends at the end of the file),
        so no two tensors share a byte and no byte is left uncovered."""
        end, previous = data_start, None
        for info in sorted(tensors.values(), key=lambda t: (t.start, t.start + t.nbytes)):
            offsets = [info.start - data_start, info.start - data_start + info.nbytes]
            where = f"{self.path}: tensor {info.name!r}: data_offsets {offsets}"
            if info.start < end:
                raise CheckpointError(f"{where} overlap tensor {previous.name!r} (ends at {end - data_start})")
            if info.start > end:
                after = f"the end of tensor {previous.name!r}" if previous else "the start of the data section"
                raise CheckpointError(f"{where} leave bytes {end - data_start}..{info.start - data_start} after "
                                      f"{after} covered by no tensor")
            end, previous = info.start + info.nbytes, info
        if end != self.size:
            last = f"the last tensor {previous.name!r} ends" if previous else "the header (no tensor data) ends"
            raise CheckpointError(f"{self.path}: {last} at byte {end} but the file has {self.size} bytes "
                                  f"({self.size - end} trailing bytes covered by no tensor)")

    def _validate_entry(self, name: str, entry: object, data_start: int) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CheckpointError(f"{where}: invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: invalid data_offsets {offsets!r}")
        nbytes = math.prod(shape) * DTYPES[dtype][1]  # Python ints: no overflow on a hostile shape
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but shape {shape} "
                f"of {dtype} needs {nbytes}"
            )
        if data_start + offsets[1] > self.size:
            raise CheckpointError(
                f"{where}: data ends at byte {data_start + offsets[1]} but the file has {self.size} bytes "
                f"(truncated file)"
            )
        return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], nbytes)

    def info(self, name: str) -> TensorInfo:
        """Header entry of ``name``; raises CheckpointError naming the file if absent."""
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this file") from None

    def _read_bytes(self, name: str, start: int, nbytes: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        if scratch is not None and scratch.dtype == torch.uint8 and scratch.is_contiguous() and scratch.numel() >= nbytes:
            buf = scratch.reshape(-1)[:nbytes]
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:]], start + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: tensor {name!r}: file ended while reading (truncated file)")
            done += n
        return buf

    def read(self, name: str, *, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor ``name`` in its stored dtype (F8 formats as raw uint8 bits).

        ``scratch``: an optional contiguous uint8 buffer of at least ``nbytes`` to read into (the result
        is then a view of it, valid until the buffer is reused).
        """
        info = self.info(name)
        torch_dtype = DTYPES[info.dtype][0]
        return self._read_bytes(name, info.start, info.nbytes, scratch).view(torch_dtype).reshape(info.shape)

    def read_row(self, name: str, index: int, *, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """``tensor[index]`` of a tensor with at least one axis, reading only that row's bytes
        (into ``scratch`` when given, as :meth:`read`).

        Returns
        -------
        torch.Tensor
            ``shape[1:]`` in the stored dtype (F8 formats as raw uint8 bits).
        """
        info = self.info(name)
        if not info.shape or not 0 <= index < info.shape[0]:
            raise IndexError(f"{self.path}: tensor {name!r} of shape {list(info.shape)}: index {index} out of range")
        return self.read_rows(name, index, index + 1, scratch=scratch)[0]

    def read_rows(self, name: str, start: int, stop: int, *, axes: int = 1, scratch: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor seen as ``[prod(shape[:axes]), *shape[axes:]]``, reading only
        their bytes (into ``scratch`` when given, as :meth:`read`).

        ``axes=1``: ``tensor[start:stop]``; ``axes=2`` on a fused ``[E, R, ...]`` tensor: rows ``r0:r1`` of
        expert ``e`` are ``start = e * R + r0, stop = e * R + r1``.

        Returns
        -------
        torch.Tensor
            ``[stop - start, *shape[axes:]]`` in the stored dtype (F8 formats as raw uint8 bits).

        Raises
        ------
        IndexError
            ``axes`` not in ``1..ndim`` or rows outside ``0..prod(shape[:axes])``; names the file and tensor.
        """
        info = self.info(name)
        if not 1 <= axes <= len(info.shape):
            raise IndexError(f"{self.path}: tensor {name!r} of shape {list(info.shape)}: cannot take rows over "
                             f"its first {axes} axes")
        n_rows = math.prod(info.shape[:axes])
        if not 0 <= start <= stop <= n_rows:
            raise IndexError(f"{self.path}: tensor {name!r} of shape {list(info.shape)}: rows {start}:{stop} out of "
                             f"range 0:{n_rows}")
        row_bytes = info.nbytes // n_rows if n_rows else 0
        data = self._read_bytes(name, info.start + start * row_bytes, (stop - start) * row_bytes, scratch)
        return data.view(DTYPES[info.dtype][0]).reshape(stop - start, *info.shape[axes:])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
