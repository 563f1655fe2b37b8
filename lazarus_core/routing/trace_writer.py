"""Stream routing records into trace shards with bounded memory; every file lands atomically, so a capture resumes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from lazarus_core.routing.trace_format import (
    ACTIVATION_DTYPES,
    ACTIVATION_FIELDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    SHARD_PATTERN,
    TraceError,
    atomic_write_bytes,
    atomic_write_json,
    layer_key,
)

DEFAULT_SHARD_BYTES = 128 * 1024 * 1024


@dataclass
class LayerBatch:
    """Routing of one MoE layer for a batch of real (non-padding) tokens.

    Attributes
    ----------
    topk_ids : np.ndarray
        int32 [t, k], experts sorted by weight, descending.
    topk_weights : np.ndarray
        float32 [t, k], the weights the experts module mixed with.
    logits : np.ndarray or None
        float16 [t, E], raw router output.
    sample_index : np.ndarray or None
        int [s], ascending indices into this batch's t tokens at which the activations were kept.
    hidden, expert_outputs, all_expert_outputs : torch.Tensor or None
        [s, H], [s, k, H], [s, E, H] in the trace's activation dtype (torch, since numpy has no bf16).
    """

    topk_ids: np.ndarray
    topk_weights: np.ndarray
    logits: np.ndarray | None = None
    sample_index: np.ndarray | None = None
    hidden: torch.Tensor | None = None
    expert_outputs: torch.Tensor | None = None
    all_expert_outputs: torch.Tensor | None = None


@dataclass
class _Buffer:
    token_ids: list[np.ndarray] = field(default_factory=list)
    doc_ids: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    layers: dict[int, list[LayerBatch]] = field(default_factory=dict)
    num_tokens: int = 0


class TraceWriter:
    """Write a routing trace directory shard by shard.

    ``trace.json`` is rewritten (atomically) after every shard with the shards done so far and a
    ``progress`` cursor (``sequences_done``), and ``complete: false`` until :meth:`close`. A crash
    therefore leaves only whole shards listed in ``trace.json``; :meth:`open` with ``resume=True``
    removes any shard file not listed there and returns the cursor to continue from.

    Parameters
    ----------
    out_dir : Path
        Trace directory (created).
    meta : dict
        Metadata for ``trace.json`` (model, family, num_experts, top_k, moe_layers, ...).
    layers : list of int
        MoE layer indices (the model's own) that every :meth:`add` provides.
    store_logits : bool
        Whether ``layers.L.logits`` are written.
    shard_tokens : int, optional
        Tokens per shard; by default chosen so a shard holds about 128 MiB.
    activations : dict, optional
        What activations every :meth:`add` provides: ``{"hidden": bool, "expert_outputs": bool,
        "all_expert_outputs": bool, "dtype": "fp16"|"bf16"|"fp32", "sample_tokens": int or None,
        "sample_fraction": float, "seed": int}`` (recorded in ``trace.json``; checked on resume).
        ``meta`` must then hold ``hidden_size``.
    """

    def __init__(self, out_dir: Path, meta: dict, layers: list[int], store_logits: bool, *,
                 shard_tokens: int | None = None, resume: bool = False, activations: dict | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.layers = sorted(layers)
        self.store_logits = store_logits
        acts = activations if activations and any(activations.get(f) for f in ACTIVATION_FIELDS) else None
        self.activations = acts
        k, e = int(meta["top_k"]), int(meta["num_experts"])
        per_token = 12 + len(self.layers) * (8 * k + (2 * e if store_logits else 0))
        if acts:
            width = torch.finfo(getattr(torch, ACTIVATION_DTYPES[acts["dtype"]])).bits // 8
            h = int(meta["hidden_size"])
            values = h * (int(bool(acts["hidden"])) + k * int(bool(acts["expert_outputs"]))
                          + e * int(bool(acts["all_expert_outputs"])))
            per_token += len(self.layers) * float(acts.get("sample_fraction", 1.0)) * (8 + width * values)
        self.shard_tokens = int(shard_tokens or max(256, DEFAULT_SHARD_BYTES // per_token))
        self.meta = dict(meta, format=FORMAT_NAME, version=FORMAT_VERSION, moe_layers=self.layers,
                         has_logits=store_logits, activations=acts, shards=[], num_tokens=0, num_documents=0,
                         complete=False, progress={"sequences_done": 0, "last_doc": -1})
        self._buf = _Buffer()
        self._pending_sequences = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.out_dir / META_FILE
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if not resume:
                raise TraceError(f"{meta_path} already exists; choose another output directory or resume")
            self._resume_from(old)
        else:
            self._remove_stray_shards(keep=set())
            atomic_write_json(meta_path, self.meta)

    @property
    def sequences_done(self) -> int:
        """Sequences already stored in completed shards (the cursor a resumed capture skips)."""
        return int(self.meta["progress"]["sequences_done"])

    def _resume_from(self, old: dict) -> None:
        for key in ("model", "corpus", "seq_len", "moe_layers", "has_logits", "num_experts", "activations"):
            if old.get(key) != self.meta.get(key):
                raise TraceError(f"cannot resume {self.out_dir / META_FILE}: its {key!r} is {old.get(key)!r}, "
                                 f"this capture has {self.meta.get(key)!r}")
        if old.get("complete"):
            raise TraceError(f"{self.out_dir / META_FILE} is already a complete trace; nothing to resume")
        for key in ("shards", "num_tokens", "num_documents", "progress"):
            self.meta[key] = old[key]
        self._remove_stray_shards(keep={s["file"] for s in self.meta["shards"]})

    def _remove_stray_shards(self, keep: set[str]) -> None:
        for path in self.out_dir.glob("trace-*.safetensors"):
            if path.name not in keep:
                path.unlink()
        for path in self.out_dir.glob(".trace-*.tmp"):
            path.unlink()

    def add(self, token_ids: np.ndarray, doc_ids: np.ndarray, positions: np.ndarray,
            layers: dict[int, LayerBatch], num_sequences: int) -> None:
        """Append the routing of ``num_sequences`` whole sequences (t real tokens in total).

        Parameters
        ----------
        token_ids, doc_ids, positions : np.ndarray
            int32 [t] each.
        layers : dict[int, LayerBatch]
            One entry per layer of ``self.layers``.
        num_sequences : int
            Sequences these tokens complete (advances the resume cursor once the shard is written).
        """
        missing = set(self.layers) - set(layers)
        if missing:
            raise ValueError(f"routing for layers {sorted(missing)} is missing from this batch")
        k = int(layers[self.layers[0]].topk_ids.shape[1])
        if k != int(self.meta["top_k"]):  # captured under an intervention that changes top-k
            if self.meta["num_tokens"] or self._buf.num_tokens:
                raise ValueError(f"top-k changed during the capture ({self.meta['top_k']} -> {k})")
            self.meta.setdefault("model_top_k", self.meta["top_k"])
            self.meta["top_k"] = k
        buf = self._buf
        buf.token_ids.append(np.asarray(token_ids, np.int32))
        buf.doc_ids.append(np.asarray(doc_ids, np.int32))
        buf.positions.append(np.asarray(positions, np.int32))
        for layer in self.layers:
            part = layers[layer]
            if self.activations:
                self._check_activations(layer, part, len(token_ids))
                part.sample_index = np.asarray(part.sample_index, np.int64) + buf.num_tokens
            buf.layers.setdefault(layer, []).append(part)
        buf.num_tokens += len(token_ids)
        self._pending_sequences += num_sequences
        if buf.num_tokens >= self.shard_tokens:
            self.flush()

    def _check_activations(self, layer: int, part: LayerBatch, t: int) -> None:
        if part.sample_index is None:
            raise ValueError(f"layer {layer}: activations were requested but this batch has no sample_index")
        s = len(part.sample_index)
        if s and (int(np.min(part.sample_index)) < 0 or int(np.max(part.sample_index)) >= t):
            raise ValueError(f"layer {layer}: sample_index outside the batch's {t} tokens")
        for name in ACTIVATION_FIELDS:
            value = getattr(part, name)
            if self.activations[name] and (value is None or value.shape[0] != s):
                raise ValueError(f"layer {layer}: {name} must have {s} rows (one per sampled token), "
                                 f"got {None if value is None else tuple(value.shape)}")

    def flush(self) -> None:
        """Write the buffered tokens as one shard and update ``trace.json`` (no-op when empty)."""
        buf = self._buf
        if buf.num_tokens == 0:
            self.meta["progress"]["sequences_done"] += self._pending_sequences
            self._pending_sequences = 0
            atomic_write_json(self.out_dir / META_FILE, self.meta)
            return
        tensors = {"token_ids": np.concatenate(buf.token_ids), "doc_ids": np.concatenate(buf.doc_ids),
                   "positions": np.concatenate(buf.positions)}
        for layer, parts in buf.layers.items():
            tensors[layer_key(layer, "topk_ids")] = np.concatenate([p.topk_ids for p in parts]).astype(np.int32)
            tensors[layer_key(layer, "topk_weights")] = np.concatenate([p.topk_weights for p in parts]).astype(np.float32)
            if self.store_logits:
                tensors[layer_key(layer, "logits")] = np.concatenate([p.logits for p in parts]).astype(np.float16)
        tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in tensors.items()}
        if self.activations:
            dtype = getattr(torch, ACTIVATION_DTYPES[self.activations["dtype"]])
            for layer, parts in buf.layers.items():
                tensors[layer_key(layer, "sample_index")] = torch.from_numpy(
                    np.concatenate([p.sample_index for p in parts]).astype(np.int32))
                for name in ACTIVATION_FIELDS:
                    if self.activations[name]:
                        tensors[layer_key(layer, name)] = torch.cat([getattr(p, name) for p in parts]).to(dtype).contiguous()
        data = save(tensors, metadata={"format": FORMAT_NAME})
        name = SHARD_PATTERN.format(len(self.meta["shards"]))
        atomic_write_bytes(self.out_dir / name, data)
        docs = tensors["doc_ids"].numpy()
        progress = self.meta["progress"]
        self.meta["num_documents"] += int(np.sum(np.unique(docs) > progress["last_doc"]))
        progress["last_doc"] = max(progress["last_doc"], int(docs.max()))
        self.meta["shards"].append({"file": name, "num_tokens": int(len(docs)), "first_doc": int(docs[0]),
                                    "last_doc": int(docs[-1]), "bytes": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest()})
        self.meta["num_tokens"] += int(len(docs))
        self.meta["progress"]["sequences_done"] += self._pending_sequences
        self._pending_sequences = 0
        atomic_write_json(self.out_dir / META_FILE, self.meta)
        self._buf = _Buffer()

    def close(self, extra_meta: dict | None = None) -> dict:
        """Flush the last shard and mark the trace complete; returns the final metadata."""
        self.flush()
        self.meta.update(extra_meta or {})
        self.meta["complete"] = True
        atomic_write_json(self.out_dir / META_FILE, self.meta)
        return self.meta
