"""Join complete traces of consecutive document ranges (the parts of a distributed capture) into one trace
in document order.

Shards are hard-linked (copied where links are not possible) under their new numbers, then ``trace.json``
is written atomically, then the parts are removed: a crash at any point leaves either the parts (merge
again) or the finished trace. Shard bytes are unchanged, so their recorded sha256 still holds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lazarus_core.atomic_io import atomic_write_json
from lazarus_core.routing.trace_format import META_FILE, SHARD_PATTERN, TraceError

# Keys every part must agree on (the rest - shards, counts, progress - is summed or concatenated).
_SAME = ("format", "version", "model", "family", "num_experts", "top_k", "moe_layers", "has_logits", "activations",
         "corpus", "seq_len", "weight_convention")


def read_part(part: Path) -> dict:
    """``trace.json`` of a finished part.

    Raises
    ------
    TraceError
        The part is missing or not complete (name the part; a rerun with ``--resume`` finishes it).
    """
    path = Path(part) / META_FILE
    if not path.is_file():
        raise TraceError(f"{path} is missing: that part of the capture never started; rerun with --resume")
    meta = json.loads(path.read_text())
    if not meta.get("complete"):
        raise TraceError(f"{path} is incomplete: rerun the capture with --resume to finish it")
    return meta


def merge_trace_parts(parts: list[Path], out_dir: Path, *, extra_meta: dict | None = None,
                      remove_parts: bool = True) -> dict:
    """Merge complete part traces (given in document order) into ``out_dir``; returns its ``trace.json``.

    Parameters
    ----------
    parts : list of Path
        Trace directories of consecutive, non-overlapping document ranges, in order.
    out_dir : Path
        Destination (may be the parts' parent). Existing ``trace-*.safetensors`` there are replaced.
    extra_meta : dict, optional
        Entries added to the merged ``trace.json`` (e.g. ``distributed``).
    remove_parts : bool
        Delete the part directories after the merged trace is written.

    Raises
    ------
    TraceError
        A part is incomplete, the parts disagree on what was captured, or their documents overlap.
    """
    metas = [read_part(p) for p in parts]
    first = metas[0]
    for part, meta in zip(parts[1:], metas[1:]):
        for key in _SAME:
            if meta.get(key) != first.get(key):
                raise TraceError(f"cannot merge {part}: its {key!r} is {meta.get(key)!r}, {parts[0]} has "
                                 f"{first.get(key)!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, last_doc, sequences = [], -1, 0
    for part, meta in zip(parts, metas):
        for shard in meta["shards"]:
            if shard["first_doc"] <= last_doc:
                raise TraceError(f"cannot merge {part}: its documents start at {shard['first_doc']}, "
                                 f"the previous part ended at document {last_doc}")
            last_doc = shard["last_doc"]
            name = SHARD_PATTERN.format(len(shards))
            _place(Path(part) / shard["file"], out_dir / name)
            shards.append(dict(shard, file=name))
        sequences += int(meta["progress"]["sequences_done"])
    merged = dict(first, shards=shards, num_tokens=sum(m["num_tokens"] for m in metas),
                  num_documents=sum(m["num_documents"] for m in metas), complete=True,
                  progress={"sequences_done": sequences, "last_doc": last_doc}, **(extra_meta or {}))
    for stale in out_dir.glob("trace-*.safetensors"):
        if stale.name not in {s["file"] for s in shards}:
            stale.unlink()
    atomic_write_json(out_dir / META_FILE, merged)
    if remove_parts:
        for part in parts:
            shutil.rmtree(part, ignore_errors=True)
    return merged


def _place(src: Path, dst: Path) -> None:
    """Put ``src``'s bytes at ``dst`` atomically (a hard link renamed into place, or a copy)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


__all__ = ["merge_trace_parts", "read_part"]
