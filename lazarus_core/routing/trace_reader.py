"""Open a routing trace as memory-mapped arrays, with access per layer, per document and per shard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from lazarus_core.routing.trace_format import (
    ACTIVATION_FIELDS,
    FORMAT_NAME,
    META_FILE,
    READABLE_VERSIONS,
    TraceError,
    bf16_bits_to_float32,
    layer_key,
    mmap_safetensors,
)


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
class LayerActivations:
    """Activations of one MoE layer at the sampled tokens of a span (trace format version 2).

    Attributes
    ----------
    layer : int
        Model layer index.
    sample_index : np.ndarray
        int64 [s], ascending indices of the sampled tokens in the span (the whole trace for
        :meth:`Trace.activations`), so ``trace.token_ids[sample_index]`` are their tokens.
    hidden : np.ndarray or None
        float32 [s, H], the router input.
    expert_outputs : np.ndarray or None
        float32 [s, k, H], each selected expert's output before weighting, in ``topk_ids`` order.
    all_expert_outputs : np.ndarray or None
        float32 [s, E, H], every expert's output.
    """

    layer: int
    sample_index: np.ndarray
    hidden: np.ndarray | None = None
    expert_outputs: np.ndarray | None = None
    all_expert_outputs: np.ndarray | None = None


@dataclass
class TokenSpan:
    """Tokens of a trace (a shard, a document or the whole trace) and their routing at every layer.

    Attributes
    ----------
    token_ids, doc_ids, positions : np.ndarray
        int32 [t] each.
    layers : dict[int, LayerTrace]
    raw_activations : dict[int, dict[str, np.ndarray]]
        Per layer, the stored activation tensors as mapped (``sample_index`` local to this span;
        bf16 as uint16 bits). Use :meth:`activations` for float32 arrays.
    activation_dtype : str or None
        ``fp16``, ``bf16`` or ``fp32`` (None: no activations).
    """

    token_ids: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray
    layers: dict[int, LayerTrace]
    raw_activations: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    activation_dtype: str | None = None

    def activations(self, layer: int) -> LayerActivations:
        """Float32 activations of one layer at this span's sampled tokens.

        Raises
        ------
        ValueError
            The layer is not in the span, or the trace holds no activations.
        """
        self.layer(layer)
        raw = self.raw_activations.get(layer)
        if raw is None:
            raise ValueError("this trace holds no activations: capture with --hidden-states, --expert-outputs "
                             "or --all-experts")
        return LayerActivations(layer, np.asarray(raw["sample_index"], np.int64),
                                **{f: _widen(raw.get(f), self.activation_dtype) for f in ACTIVATION_FIELDS})

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
        self.version = int(meta.get("version", 1))
        acts = meta.get("activations") or {}
        self.activation_meta: dict = acts
        self.has_hidden = bool(acts.get("hidden"))
        self.has_expert_outputs = bool(acts.get("expert_outputs"))
        self.has_all_expert_outputs = bool(acts.get("all_expert_outputs"))
        self.hidden_size: int | None = meta.get("hidden_size")

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

    def activations(self, layer: int) -> LayerActivations:
        """Activations of one layer at every sampled token of the trace, as float32.

        Parameters
        ----------
        layer : int
            Model layer index.

        Returns
        -------
        LayerActivations
            ``sample_index`` int64 [s] into the whole trace; the requested fields float32, others None.

        Raises
        ------
        ValueError
            The layer was not captured, or the trace has no activations (the message names the flags).
        """
        parts, offset = [], 0
        for shard in self._shards:
            part = shard.activations(layer)
            part.sample_index = part.sample_index + offset
            parts.append(part)
            offset += len(shard)

        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else self._concat(values)

        return LayerActivations(layer, cat("sample_index"), *(cat(f) for f in ACTIVATION_FIELDS))

    def to_numpy(self, layer: int, name: str) -> np.ndarray:
        """One per-layer array of the whole trace by name.

        Parameters
        ----------
        layer : int
            Model layer index.
        name : {"topk_ids", "topk_weights", "logits", "sample_index", "hidden", "expert_outputs", "all_expert_outputs"}
            ``topk_ids`` int32 [t, k], ``topk_weights`` float32 [t, k], ``logits`` float16 [t, E];
            activations float32 ([s, H], [s, k, H], [s, E, H]) with ``sample_index`` int64 [s].

        Raises
        ------
        ValueError
            Unknown name, or a field the trace does not hold (naming the capture flag).
        """
        flags = {"logits": "--logits", "hidden": "--hidden-states", "expert_outputs": "--expert-outputs",
                 "all_expert_outputs": "--all-experts"}
        if name in ("topk_ids", "topk_weights", "logits"):
            value = getattr(self.layer(layer), name)
        elif name in ("sample_index", *ACTIVATION_FIELDS):
            if not self.activation_meta and name == "sample_index":
                raise ValueError(f"the trace {self.path} holds no activations (capture with --hidden-states, "
                                 "--expert-outputs or --all-experts)")
            value = getattr(self.activations(layer), name) if self.activation_meta else None
        else:
            raise ValueError(f"unknown trace field {name!r}; choose from topk_ids, topk_weights, logits, sample_index, "
                             f"{', '.join(ACTIVATION_FIELDS)}")
        if value is None:
            raise ValueError(f"the trace {self.path} was captured without {flags[name]}")
        return value

    def to_pandas(self, layer: int):
        """Routing of one layer in long format: one row per (token, slot).

        Columns: ``token_index`` (int64, position in the trace), ``token_id``, ``doc_id``, ``position``,
        ``slot`` (0 = the primary, highest-weight expert), ``expert``, ``weight`` (float32, as mixed),
        and ``logit`` (float32, that expert's raw router logit) when the trace has logits.

        Returns
        -------
        pandas.DataFrame
            ``num_tokens * top_k`` rows.

        Raises
        ------
        ImportError
            pandas is not installed (``pip install "lazarus-core[pandas]"``).
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError('Trace.to_pandas needs pandas: pip install "lazarus-core[pandas]"') from None
        lt = self.layer(layer)
        t, k = lt.topk_ids.shape
        columns = {
            "token_index": np.repeat(np.arange(t, dtype=np.int64), k),
            "token_id": np.repeat(self.token_ids, k),
            "doc_id": np.repeat(self.doc_ids, k),
            "position": np.repeat(self.positions, k),
            "slot": np.tile(np.arange(k, dtype=np.int32), t),
            "expert": np.asarray(lt.topk_ids).reshape(-1),
            "weight": np.asarray(lt.topk_weights).reshape(-1),
        }
        if lt.logits is not None:
            columns["logit"] = np.take_along_axis(np.asarray(lt.logits), np.asarray(lt.topk_ids, np.int64), 1) \
                .astype(np.float32).reshape(-1)
        return pd.DataFrame(columns)

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
        raw: dict[int, dict[str, np.ndarray]] = {}
        if pieces[0].raw_activations:
            offsets = np.cumsum([0] + [len(p) for p in pieces[:-1]])
            for l in self.layers:
                names = pieces[0].raw_activations[l].keys()
                raw[l] = {n: np.concatenate([p.raw_activations[l][n] + (o if n == "sample_index" else 0)
                                             for p, o in zip(pieces, offsets)]) for n in names}
        return TokenSpan(np.concatenate([p.token_ids for p in pieces]), np.concatenate([p.doc_ids for p in pieces]),
                         np.concatenate([p.positions for p in pieces]),
                         {l: LayerTrace(l, np.concatenate([p.layers[l].topk_ids for p in pieces]),
                                        np.concatenate([p.layers[l].topk_weights for p in pieces]),
                                        np.concatenate([p.layers[l].logits for p in pieces]) if self.has_logits else None)
                          for l in self.layers}, raw, pieces[0].activation_dtype)


def _widen(values: np.ndarray | None, dtype: str | None) -> np.ndarray | None:
    if values is None:
        return None
    return bf16_bits_to_float32(values) if dtype == "bf16" else np.asarray(values, dtype=np.float32)


def _slice(span: TokenSpan, sl: slice) -> TokenSpan:
    raw = {}
    for l, fields in span.raw_activations.items():
        idx = np.asarray(fields["sample_index"])
        keep = (idx >= sl.start) & (idx < sl.stop)
        raw[l] = {n: (v[keep] - sl.start if n == "sample_index" else v[keep]) for n, v in fields.items()}
    return TokenSpan(span.token_ids[sl], span.doc_ids[sl], span.positions[sl],
                     {l: LayerTrace(l, t.topk_ids[sl], t.topk_weights[sl], None if t.logits is None else t.logits[sl])
                      for l, t in span.layers.items()}, raw, span.activation_dtype)


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
    if int(meta.get("version", 1)) not in READABLE_VERSIONS:
        raise TraceError(f"{meta_path}: trace format version {meta.get('version')} is not readable by this "
                         f"lazarus-core (it reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade it")
    if not meta.get("complete") and not allow_incomplete:
        raise TraceError(f"{meta_path}: the capture did not finish ({meta.get('num_tokens', 0)} tokens in "
                         f"{len(meta.get('shards', []))} shards): finish it with the same `lazarus capture` command and --resume")
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
    acts = meta.get("activations") or {}
    if acts:
        h, dtype = int(meta["hidden_size"]), {"fp16": np.float16, "fp32": np.float32, "bf16": np.uint16}[acts["dtype"]]
        for layer in meta["moe_layers"]:
            index = arrays.get(layer_key(layer, "sample_index"))
            s = None if index is None or index.ndim != 1 else int(index.shape[0])
            if s is None:
                raise TraceError(f"trace shard {path} is corrupt: {layer_key(layer, 'sample_index')!r} is missing")
            if s and (int(index.min()) < 0 or int(index.max()) >= t or np.any(np.diff(index) <= 0)):
                raise TraceError(f"trace shard {path} is corrupt: {layer_key(layer, 'sample_index')!r} is not an "
                                 f"ascending index into its {t} tokens")
            for name, shape in (("hidden", (s, h)), ("expert_outputs", (s, k, h)), ("all_expert_outputs", (s, e, h))):
                if acts.get(name):
                    expected[layer_key(layer, name)] = shape
                    value = arrays.get(layer_key(layer, name))
                    if value is not None and value.dtype != dtype:
                        raise TraceError(f"trace shard {path} is corrupt: {layer_key(layer, name)!r} is "
                                         f"{value.dtype}, trace.json says {acts['dtype']}")
    for name, shape in expected.items():
        if name not in arrays:
            raise TraceError(f"trace shard {path} is corrupt: tensor {name!r} is missing")
        if arrays[name].shape != shape:
            raise TraceError(f"trace shard {path} is corrupt: {name!r} has shape {arrays[name].shape}, expected {shape}")
    layers = {l: LayerTrace(l, arrays[layer_key(l, "topk_ids")], arrays[layer_key(l, "topk_weights")],
                            arrays.get(layer_key(l, "logits"))) for l in meta["moe_layers"]}
    raw = {}
    if acts:
        raw = {l: {n: arrays[layer_key(l, n)] for n in ("sample_index", *ACTIVATION_FIELDS) if layer_key(l, n) in arrays}
               for l in meta["moe_layers"]}
    return TokenSpan(arrays["token_ids"], arrays["doc_ids"], arrays["positions"], layers, raw,
                     acts.get("dtype") if acts else None)
