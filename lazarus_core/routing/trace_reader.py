"""Open a routing trace as memory-mapped arrays, with access per layer, per document and per shard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lazarus_core.routing.trace_format import FORMAT_NAME, META_FILE, TraceError, layer_key, mmap_safetensors


@dataclass
class LayerTrace:
    """Routing of one MoE layer over a span of tokens.

    Attributes
    ----------
    layer : int
        Model layer index.
    topk_ids : np.ndarray
        int32 [t, k], sorted by weight, descending.
    topk_weights : np.ndarray
        float32 [t, k], the weights the model mixed with.
    logits : np.ndarray or None
        float16 [t, E], raw router output (None when the trace has no logits).
    """

    layer: int
    topk_ids: np.ndarray
    topk_weights: np.ndarray
    logits: np.ndarray | None = None


@dataclass
class TokenSpan:
    """Tokens of a trace (a shard, a document or the whole trace) and their routing at every layer.

    Attributes
    ----------
    token_ids, doc_ids, positions : np.ndarray
        int32 [t] each.
    layers : dict[int, LayerTrace]
    """

    token_ids: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray
    layers: dict[int, LayerTrace]

    def __len__(self) -> int:
        return len(self.token_ids)

    def layer(self, layer: int) -> LayerTrace:
        """Routing at one model layer; raises ValueError naming the valid layers."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not in this trace; its layers are {sorted(self.layers)}")
        return self.layers[layer]


class Trace:
    """A routing trace directory opened for reading; arrays are memory-mapped, not loaded.

    Use :func:`load_trace` to open one.

    Attributes
    ----------
    path : Path
    meta : dict
        ``trace.json``.
    layers : list of int
        MoE layers captured (model layer indices).
    num_tokens, num_experts, top_k : int
    """

    def __init__(self, path: Path, meta: dict, shards: list[TokenSpan]) -> None:
        self.path = path
        self.meta = meta
        self._shards = shards
        self.layers: list[int] = list(meta["moe_layers"])
        self.num_tokens = int(meta["num_tokens"])
        self.num_experts = int(meta["num_experts"])
        self.top_k = int(meta["top_k"])
        self.has_logits = bool(meta["has_logits"])

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def shards(self) -> Iterator[TokenSpan]:
        """Yield each shard in order (bounded memory: nothing is concatenated)."""
        yield from self._shards

    def _concat(self, arrays: list[np.ndarray]) -> np.ndarray:
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    @property
    def token_ids(self) -> np.ndarray:
        """int32 [num_tokens]."""
        return self._concat([s.token_ids for s in self._shards])

    @property
    def doc_ids(self) -> np.ndarray:
        """int32 [num_tokens]."""
        return self._concat([s.doc_ids for s in self._shards])

    @property
    def positions(self) -> np.ndarray:
        """int32 [num_tokens], 0 at the first token of each window the model saw."""
        return self._concat([s.positions for s in self._shards])

    def layer(self, layer: int) -> LayerTrace:
        """Routing at one model layer over the whole trace (a memory map when the trace has one shard).

        Raises
        ------
        ValueError
            ``layer`` was not captured; the message lists the captured layers.
        """
        parts = [s.layer(layer) for s in self._shards]
        return LayerTrace(layer, self._concat([p.topk_ids for p in parts]),
                          self._concat([p.topk_weights for p in parts]),
                          self._concat([p.logits for p in parts]) if self.has_logits else None)

    def document_ids(self) -> np.ndarray:
        """int32 [d], the documents present, ascending."""
        return np.unique(np.concatenate([np.unique(s.doc_ids) for s in self._shards]))

    def document(self, doc_id: int) -> TokenSpan:
        """Tokens and routing of one document (``doc_id`` = index in the captured corpus).

        Raises
        ------
        ValueError
            The document is not in the trace.
        """
        pieces = []
        for entry, shard in zip(self.meta["shards"], self._shards):
            if entry["first_doc"] <= doc_id <= entry["last_doc"]:
                lo, hi = np.searchsorted(shard.doc_ids, [doc_id, doc_id + 1])
                if hi > lo:
                    pieces.append(_slice(shard, slice(int(lo), int(hi))))
        if not pieces:
            raise ValueError(f"document {doc_id} is not in the trace {self.path} "
                             f"({self.meta['num_documents']} documents)")
        if len(pieces) == 1:
            return pieces[0]
        return TokenSpan(np.concatenate([p.token_ids for p in pieces]), np.concatenate([p.doc_ids for p in pieces]),
                         np.concatenate([p.positions for p in pieces]),
                         {l: LayerTrace(l, np.concatenate([p.layers[l].topk_ids for p in pieces]),
                                        np.concatenate([p.layers[l].topk_weights for p in pieces]),
                                        np.concatenate([p.layers[l].logits for p in pieces]) if self.has_logits else None)
                          for l in self.layers})


def _slice(span: TokenSpan, sl: slice) -> TokenSpan:
    return TokenSpan(span.token_ids[sl], span.doc_ids[sl], span.positions[sl],
                     {l: LayerTrace(l, t.topk_ids[sl], t.topk_weights[sl], None if t.logits is None else t.logits[sl])
                      for l, t in span.layers.items()})


def load_trace(path: str | Path, *, verify: bool = False, allow_incomplete: bool = False) -> Trace:
    """Open a trace directory written by :func:`lazarus_core.routing.capture_routing`.

    Every shard listed in ``trace.json`` is checked (present, header sound, sizes and shapes as
    declared) and memory-mapped.

    Parameters
    ----------
    path : str or Path
        Trace directory.
    verify : bool
        Also check each shard's sha256 against ``trace.json`` (reads every byte).
    allow_incomplete : bool
        Open a trace whose capture has not finished (only its completed shards).

    Raises
    ------
    TraceError
        Missing or unreadable ``trace.json``, a missing, truncated or corrupt shard, or an incomplete
        trace; the message names the file.
    """
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise TraceError(f"{meta_path} not found: {path} is not a routing trace directory")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise TraceError(f"{meta_path} is not valid JSON ({exc.msg})") from None
    if meta.get("format") != FORMAT_NAME:
        raise TraceError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if not meta.get("complete") and not allow_incomplete:
        raise TraceError(f"{meta_path}: the capture did not finish ({meta.get('num_tokens', 0)} tokens in "
                         f"{len(meta.get('shards', []))} shards); resume it, or pass allow_incomplete=True")
    if not meta.get("shards"):
        raise TraceError(f"{meta_path} lists no shards")
    shards = [_open_shard(path / entry["file"], entry, meta, verify) for entry in meta["shards"]]
    total = sum(len(s) for s in shards)
    if total != int(meta["num_tokens"]):
        raise TraceError(f"{meta_path}: num_tokens is {meta['num_tokens']} but the shards hold {total}")
    return Trace(path, meta, shards)


def _open_shard(path: Path, entry: dict, meta: dict, verify: bool) -> TokenSpan:
    if not path.is_file():
        raise TraceError(f"trace shard {path} listed in {META_FILE} is missing")
    if path.stat().st_size != entry["bytes"]:
        raise TraceError(f"trace shard {path} is corrupt or truncated: {path.stat().st_size} bytes, "
                         f"{META_FILE} says {entry['bytes']}")
    arrays = mmap_safetensors(path)
    if verify:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise TraceError(f"trace shard {path} is corrupt: sha256 {digest[:12]}... does not match {META_FILE}")
    t, k, e = int(entry["num_tokens"]), int(meta["top_k"]), int(meta["num_experts"])
    expected = {"token_ids": (t,), "doc_ids": (t,), "positions": (t,)}
    for layer in meta["moe_layers"]:
        expected[layer_key(layer, "topk_ids")] = (t, k)
        expected[layer_key(layer, "topk_weights")] = (t, k)
        if meta["has_logits"]:
            expected[layer_key(layer, "logits")] = (t, e)
    for name, shape in expected.items():
        if name not in arrays:
            raise TraceError(f"trace shard {path} is corrupt: tensor {name!r} is missing")
        if arrays[name].shape != shape:
            raise TraceError(f"trace shard {path} is corrupt: {name!r} has shape {arrays[name].shape}, expected {shape}")
    layers = {l: LayerTrace(l, arrays[layer_key(l, "topk_ids")], arrays[layer_key(l, "topk_weights")],
                            arrays.get(layer_key(l, "logits"))) for l in meta["moe_layers"]}
    return TokenSpan(arrays["token_ids"], arrays["doc_ids"], arrays["positions"], layers)
