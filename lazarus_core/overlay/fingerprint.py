"""Bind an overlay to the checkpoint it was made from: a fingerprint of every routed-expert tensor of the
compressed layers (name, dtype, shape, sha256 of a deterministic sample of its bytes or of all of them), read
straight from the safetensors files, so an overlay is never applied to, verified against or resumed on
another model (docs/overlay_format.md, "Source fingerprint").

The sample is ``SAMPLE_CHUNKS`` runs of ``SAMPLE_CHUNK_BYTES`` bytes at evenly spaced offsets of the tensor's
data, first and last byte included (all bytes when the tensor is smaller): 64 KiB of positioned reads per
tensor however large the shard, so checking costs milliseconds per layer. Two different models differ in
every run; an edit of a few weights between runs escapes it, which ``full_hash=True`` (``--full-hash``)
closes: it records the sha256 of all bytes too (``sha256_all``). Loading compares the sample only (loading
reads no expert weights, so it must not read them all to check them); verifying and resuming, which read every
expert anyway, compare all bytes when the fingerprint has them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from typing import Any, Iterator

from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint
from lazarus_core.models.resolve import SINGLE_NAME, ModelSource
from lazarus_core.models.safetensors_file import SafetensorsFile, TensorInfo

FINGERPRINT_VERSION = 1
SAMPLE_CHUNKS = 16
SAMPLE_CHUNK_BYTES = 4096
_READ_BLOCK = 16 << 20  # full hashes stream the tensor in blocks of this many bytes


class OverlaySourceMismatch(ValueError):
    """The overlay was made from another checkpoint than the one given; the message names the first differing
    tensor (or the structural difference) and the model the overlay records."""


def _natural_key(name: str) -> list:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


class _SourceFiles:
    """Tensor name -> (file, header entry) of one checkpoint, through the public source and file readers."""

    def __init__(self, ckpt: MoeCheckpoint):
        self.source = ckpt.source
        self.weight_map = ckpt.source.weight_map()
        self._files: dict[str, SafetensorsFile] = {}
        if not self.weight_map:  # a single model.safetensors: its header is the map
            self.weight_map = {name: SINGLE_NAME for name in self.file(SINGLE_NAME).tensors}

    def file(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            self._files[filename] = SafetensorsFile(self.source.local_path(filename))
        return self._files[filename]

    def locate(self, name: str) -> tuple[SafetensorsFile, TensorInfo]:
        f = self.file(self.weight_map[name])
        return f, f.info(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def expert_tensor_names(ckpt: MoeCheckpoint, layer: int, weight_map: dict[str, str] | None = None) -> list[str]:
    """Names of every routed-expert tensor of MoE layer ``layer`` as stored (weights, biases, MXFP4 blocks and
    scales, FP8 ``weight_scale_inv``), in natural order (expert 2 before expert 10).

    Parameters
    ----------
    ckpt : MoeCheckpoint
    layer : int
        Model layer index.
    weight_map : dict, optional
        Tensor name -> file (default: the checkpoint's own).
    """
    if weight_map is None:
        files = _SourceFiles(ckpt)
        weight_map = files.weight_map
        files.close()
    prefix = ckpt.spec.names.moe_prefix(layer) + "experts."
    return sorted((n for n in weight_map if n.startswith(prefix)), key=_natural_key)


def _sample_offsets(nbytes: int, chunks: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` runs covering the sample: everything when the tensor is small."""
    if nbytes <= chunks * chunk_bytes:
        yield 0, nbytes
        return
    span = nbytes - chunk_bytes
    for k in range(chunks):
        yield span * k // (chunks - 1), chunk_bytes


def _tensor_digest(f: SafetensorsFile, info: TensorInfo, *, full: bool, chunks: int, chunk_bytes: int) -> str:
    h = hashlib.sha256()
    h.update(info.nbytes.to_bytes(8, "little"))
    runs = ((o, min(_READ_BLOCK, info.nbytes - o)) for o in range(0, info.nbytes, _READ_BLOCK)) if full else \
        _sample_offsets(info.nbytes, chunks, chunk_bytes)
    with open(f.path, "rb") as fh:
        for offset, length in runs:
            data = os.pread(fh.fileno(), length, info.start + offset)
            if len(data) != length:
                raise OSError(f"{f.path}: tensor {info.name!r} ends before its header says (a truncated file)")
            h.update(data)
    return h.hexdigest()


def _entries(files: _SourceFiles, names: list[str], *, full: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    for name in names:
        f, info = files.locate(name)
        entry = {"dtype": info.dtype, "shape": list(info.shape),
                 "sha256": _tensor_digest(f, info, full=False, chunks=SAMPLE_CHUNKS, chunk_bytes=SAMPLE_CHUNK_BYTES)}
        if full:
            entry["sha256_all"] = _tensor_digest(f, info, full=True, chunks=0, chunk_bytes=0)
        yield name, entry


def source_fingerprint(ckpt: MoeCheckpoint, layers: list[int], *, full_hash: bool = False) -> dict[str, Any]:
    """Fingerprint of the routed-expert tensors of ``layers`` (what ``overlay_config.json`` records).

    Parameters
    ----------
    ckpt : MoeCheckpoint
    layers : list of int
        MoE layers (model layer indices) the overlay covers.
    full_hash : bool
        Also hash every byte of every expert tensor (``sha256_all``), besides the deterministic sample.

    Returns
    -------
    dict
        JSON-able: ``{"version", "revision", "full_hash", "sample": {"chunks", "chunk_bytes"}, "layers",
        "tensors": {name: {"dtype", "shape", "sha256" (sample), "sha256_all" (with full_hash)}}}`` (names in
        natural order).
    """
    files = _SourceFiles(ckpt)
    try:
        names = [n for layer in sorted(set(layers)) for n in expert_tensor_names(ckpt, layer, files.weight_map)]
        tensors = dict(_entries(files, names, full=full_hash))
    finally:
        files.close()
    return {"version": FINGERPRINT_VERSION, "revision": ckpt.source.revision, "full_hash": bool(full_hash),
            "sample": {"chunks": SAMPLE_CHUNKS, "chunk_bytes": SAMPLE_CHUNK_BYTES},
            "layers": sorted(set(int(x) for x in layers)), "tensors": tensors}


def layer_digest(ckpt: MoeCheckpoint, fingerprint: dict[str, Any], layer: int) -> str:
    """sha256 of one layer's entries of ``fingerprint``: identifies the source of a shard or a saved plan."""
    prefix = ckpt.spec.names.moe_prefix(layer) + "experts."
    entries = {n: e for n, e in fingerprint["tensors"].items() if n.startswith(prefix)}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _structure_problem(ckpt: MoeCheckpoint, config: dict[str, Any]) -> str | None:
    """Why the overlay cannot be applied to ``ckpt`` at all (family, experts, layers, shapes), or None."""
    if config.get("family") != ckpt.family or int(config.get("num_experts", -1)) != ckpt.num_experts:
        return (f"the overlay is for a {config.get('family')} model with {config.get('num_experts')} experts, the "
                f"source is {ckpt.family} with {ckpt.num_experts}")
    for layer in config.get("moe_layers", []):
        if int(layer) not in ckpt.moe_layers:
            return f"the overlay has MoE layer {layer}, the source's MoE layers are {list(ckpt.moe_layers)}"
        projections = config.get("layers", {}).get(str(layer), {}).get("projections", {})
        for p in PROJECTIONS:
            shape = projections.get(p, {}).get("shape")
            if shape is not None and tuple(shape) != ckpt.projection_shape(p):
                return (f"layer {layer} {p}: the overlay's shape is {list(shape)}, the source's "
                        f"{list(ckpt.projection_shape(p))}")
    return None


def _content_problem(ckpt: MoeCheckpoint, fingerprint: dict[str, Any], all_bytes: bool) -> str | None:
    """The first tensor whose name, dtype, shape or hash differs from ``fingerprint``, described, or None
    (``all_bytes``: the all-bytes hashes are compared too, where the fingerprint has them)."""
    recorded: dict[str, dict] = fingerprint.get("tensors", {})
    sample = fingerprint.get("sample") or {}
    files = _SourceFiles(ckpt)
    try:
        current = [n for layer in fingerprint.get("layers", [])
                   for n in expert_tensor_names(ckpt, int(layer), files.weight_map)]
        for name in sorted(set(current) | set(recorded), key=_natural_key):
            if name not in recorded:
                return f"tensor {name!r} is in the source but not in the overlay's fingerprint"
            want = recorded[name]
            if name not in files.weight_map:
                return f"tensor {name!r} is missing from the source"
            f, info = files.locate(name)
            if info.dtype != want.get("dtype") or list(info.shape) != list(want.get("shape", [])):
                return (f"tensor {name!r} is {info.dtype} {list(info.shape)} in the source, {want.get('dtype')} "
                        f"{want.get('shape')} in the overlay's fingerprint")
            checks = [("sha256", "its sampled bytes", False)]
            if all_bytes and "sha256_all" in want:
                checks.append(("sha256_all", "all its bytes", True))
            for key, what, full in checks:
                got = _tensor_digest(f, info, full=full, chunks=int(sample.get("chunks", SAMPLE_CHUNKS)),
                                     chunk_bytes=int(sample.get("chunk_bytes", SAMPLE_CHUNK_BYTES)))
                if got != want.get(key):
                    return (f"tensor {name!r} differs (sha256 of {what}: {got[:12]}... in the source, "
                            f"{str(want.get(key))[:12]}... in the overlay's fingerprint)")
    finally:
        files.close()
    return None


def source_mismatch(ckpt: MoeCheckpoint, config: dict[str, Any], *, all_bytes: bool = True) -> str | None:
    """How the checkpoint differs from the one the overlay ``config`` was made from, described in one line
    (structure first, then the first fingerprinted tensor that differs), or None when it matches (or when the
    config has no fingerprint and the structure fits). ``all_bytes``: compare the all-bytes hashes of a
    ``--full-hash`` fingerprint too (reads every expert byte)."""
    problem = _structure_problem(ckpt, config)
    fingerprint = config.get("source", {}).get("fingerprint")
    if problem is None and fingerprint is not None:
        problem = _content_problem(ckpt, fingerprint, all_bytes)
    return problem


def _recorded(config: dict[str, Any]) -> str:
    src = config.get("source", {})
    rev = src.get("revision")
    return f"{src.get('model')!r}" + (f" at revision {rev!r}" if rev else "")


def check_source(ckpt: MoeCheckpoint | ModelSource, config: dict[str, Any], *, force: bool = False,
                 overlay: str | os.PathLike | None = None, all_bytes: bool = False) -> None:
    """Refuse to apply, verify or resume an overlay on a checkpoint it was not made from.

    Parameters
    ----------
    ckpt : MoeCheckpoint or ModelSource
        The checkpoint at hand.
    config : dict
        The overlay's ``overlay_config.json``.
    force : bool
        Apply a content mismatch anyway: print a loud warning to stderr instead of raising. A structural
        mismatch (family, number of experts, layers, shapes) is refused even so.
    overlay : str or PathLike, optional
        The overlay directory, named in the messages.
    all_bytes : bool
        Also compare the all-bytes hashes of a ``--full-hash`` fingerprint (reads every expert byte: for callers
        that read them anyway, as verify does; loading compares the sample only).

    Raises
    ------
    OverlaySourceMismatch
        A structural mismatch, or (without ``force``) a fingerprinted tensor that differs: the message names the
        first differing tensor and the model the overlay was made from.

    Notes
    -----
    An overlay written before fingerprints (no ``source.fingerprint`` in its config) is checked for structure
    only, with a one-line warning on stderr.
    """
    if isinstance(ckpt, ModelSource):
        ckpt = MoeCheckpoint(ckpt)
    label = f"overlay {overlay}" if overlay is not None else "the overlay"
    problem = _structure_problem(ckpt, config)
    if problem is not None:
        raise OverlaySourceMismatch(f"{label} (made from {_recorded(config)}) does not fit {ckpt.source.name}: "
                                    f"{problem}; --force cannot override this")
    fingerprint = config.get("source", {}).get("fingerprint")
    if fingerprint is None:
        print(f"lazarus: warning: {label} records no source fingerprint (written before fingerprints); it cannot "
              f"be checked against {ckpt.source.name}", file=sys.stderr)
        return
    problem = _content_problem(ckpt, fingerprint, all_bytes)
    if problem is None:
        return
    if config.get("source", {}).get("model") == ckpt.source.name:
        message = f"{label} was made from {_recorded(config)}, whose expert files have changed since: {problem}"
    else:
        message = f"{label} was made from {_recorded(config)}, not from {ckpt.source.name}: {problem}"
    if not force:
        raise OverlaySourceMismatch(f"{message}; pass --force (force=True) to use it anyway")
    print(f"lazarus: WARNING: --force: {message}. Using it anyway: results will not be those of the model the "
          f"overlay was made from.", file=sys.stderr)


__all__ = ["OverlaySourceMismatch", "check_source", "expert_tensor_names", "layer_digest", "source_fingerprint",
           "source_mismatch"]
