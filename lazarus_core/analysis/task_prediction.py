"""Can an early hidden state tell which experts later layers need? A held-out prefetch probe vs simple sets, with costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from lazarus_core.analysis.attention_prediction import fit_linear_probe, split_documents
from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci

PREFETCHERS = ("probe", "most_frequent", "previous_token")


def prefetch_hits(pred: np.ndarray, topk_ids: np.ndarray) -> np.ndarray:
    """int64 [n]: how many of each token's k experts are in its prefetch set ``pred`` int [n, m]."""
    return (np.asarray(pred)[:, :, None] == np.asarray(topk_ids)[:, None, :]).any(1).sum(1)


def ranked_sets(scores: np.ndarray, m: int) -> np.ndarray:
    """int64 [n, m]: the ``m`` best-scored experts per row of ``scores`` float [n, E] (stable on ties)."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :m]


def most_frequent_scores(train_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """float64 [E]: training loads (times in any of the k slots), ties broken by primary count."""
    load = np.bincount(np.asarray(train_ids).reshape(-1), minlength=num_experts).astype(np.float64)
    return load + np.bincount(np.asarray(train_ids)[:, 0], minlength=num_experts) / (len(train_ids) + 1.0)


def previous_token_scores(topk_ids: np.ndarray, rows: np.ndarray, positions: np.ndarray,
                          fallback: np.ndarray) -> np.ndarray:
    """float64 [n, E]: the previous token's experts at the target layer first (by weight), then ``fallback``.

    Parameters
    ----------
    topk_ids : np.ndarray
        int [T, k] the routing of the whole trace at the target layer, sorted by weight.
    rows : np.ndarray
        int [n] the trace rows predicted.
    positions : np.ndarray
        int [T] position in the window; a token at position 0 has no previous token and gets ``fallback``.
    fallback : np.ndarray
        float [E] scores filling the set beyond the previous token's k (the most-frequent order).
    """
    rows = np.asarray(rows, np.int64)
    e = len(fallback)
    base = (np.argsort(np.argsort(fallback, kind="stable"), kind="stable") / e)[None, :]   # in [0, 1)
    out = np.repeat(base, len(rows), 0)
    has_prev = np.asarray(positions)[rows] > 0
    prev = np.maximum(rows - 1, 0)
    ids = np.asarray(topk_ids, np.int64)[prev]
    k = ids.shape[1]
    rank_bonus = 2.0 + (k - np.arange(k))[None, :].astype(np.float64)     # slot 0 highest
    bonus = np.zeros_like(out)
    np.put_along_axis(bonus, ids, rank_bonus.repeat(len(rows), 0), 1)
    return np.where(has_prev[:, None], out + bonus, out)


@dataclass
class PrefetchScore:
    """One prefetcher's held-out score at one target layer, with a set of m experts per token.

    Attributes
    ----------
    name : str
        ``probe``, ``most_frequent`` or ``previous_token``.
    precision : Interval
        Mean share of the m prefetched experts the token used (bootstrap over held-out documents).
    recall : Interval
        Mean share of the token's k experts that were prefetched; miss rate = 1 - recall.
    """

    name: str
    precision: Interval
    recall: Interval

    @property
    def miss_rate(self) -> float:
        return 1.0 - self.recall.estimate

    def to_dict(self) -> dict:
        return {"name": self.name, "precision": self.precision.to_dict(), "recall": self.recall.to_dict(),
                "miss_rate": self.miss_rate}


@dataclass
class LayerCost:
    """The memory / transfer trade-off of prefetching m of E experts at one layer.

    Attributes
    ----------
    expert_bytes : int
        Bytes of one routed expert as stored.
    resident_bytes, all_bytes : int
        m x expert_bytes (kept) vs E x expert_bytes (every expert resident).
    loads_avoided : float
        1 - m / E: share of the layer's experts never loaded ahead.
    prefetch_ms : float
        Time to transfer the m experts at ``bandwidth_gbs``.
    miss_ms_per_token : float
        Expected on-demand transfer per token for the probe's misses: k x miss rate x expert_bytes / bandwidth.
    miss_ms_per_token_most_frequent : float
        The same for the most-frequent set (baseline).
    """

    expert_bytes: int
    resident_bytes: int
    all_bytes: int
    loads_avoided: float
    prefetch_ms: float
    miss_ms_per_token: float
    miss_ms_per_token_most_frequent: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LayerTaskPrediction:
    """Prefetch prediction for one later layer from the probe layer's hidden state.

    Attributes
    ----------
    layer : int
        Target layer.
    prefetch_size, num_experts, top_k : int
    prefetchers : list of PrefetchScore
    recall_gain : Interval
        Paired recall difference, probe minus the better baseline (bootstrap over documents).
    best_baseline : str
    curve : list of dict
        Per m = 1..E: ``m``, and the mean recall of each prefetcher (the whole trade-off).
    cost : LayerCost or None
    """

    layer: int
    prefetch_size: int
    num_experts: int
    top_k: int
    prefetchers: list[PrefetchScore]
    recall_gain: Interval
    best_baseline: str
    curve: list[dict]
    cost: LayerCost | None = None

    def prefetcher(self, name: str) -> PrefetchScore:
        return next(p for p in self.prefetchers if p.name == name)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "prefetch_size": self.prefetch_size, "num_experts": self.num_experts,
                "top_k": self.top_k, "loads_avoided": 1.0 - self.prefetch_size / self.num_experts,
                "prefetchers": {p.name: p.to_dict() for p in self.prefetchers},
                "recall_gain": self.recall_gain.to_dict(), "best_baseline": self.best_baseline, "curve": self.curve,
                "cost": None if self.cost is None else self.cost.to_dict()}


@dataclass
class TaskPrediction:
    """Prefetch prediction of every later layer from one probe layer.

    Attributes
    ----------
    probe_layer : int
    layers : list of LayerTaskPrediction
    train_tokens, test_tokens, train_documents, test_documents : int
    bandwidth_gbs : float
    bytes_source : str or None
        Where the expert sizes come from.
    test_fraction, l2 : float
    steps, seed : int
    """

    probe_layer: int
    layers: list[LayerTaskPrediction]
    train_tokens: int
    test_tokens: int
    train_documents: int
    test_documents: int
    bandwidth_gbs: float
    bytes_source: str | None
    test_fraction: float
    l2: float
    steps: int
    seed: int

    def to_dict(self) -> dict:
        return {"probe_layer": self.probe_layer, "layers": [l.to_dict() for l in self.layers],
                "train_tokens": self.train_tokens, "test_tokens": self.test_tokens,
                "train_documents": self.train_documents, "test_documents": self.test_documents,
                "bandwidth_gbs": self.bandwidth_gbs, "bytes_source": self.bytes_source,
                "test_fraction": self.test_fraction, "l2": self.l2, "steps": self.steps, "seed": self.seed}

    def tables(self) -> dict[str, list[dict]]:
        """CSV: ``prefetch`` (layer x prefetcher at m) and ``curve`` (layer x m)."""
        rows, curve = [], []
        for l in self.layers:
            for p in l.prefetchers:
                rows.append({"layer": l.layer, "prefetcher": p.name, "m": l.prefetch_size,
                             "precision": p.precision.estimate, "precision_low": p.precision.low,
                             "precision_high": p.precision.high, "recall": p.recall.estimate,
                             "recall_low": p.recall.low, "recall_high": p.recall.high, "miss_rate": p.miss_rate,
                             **({} if l.cost is None else {"resident_bytes": l.cost.resident_bytes,
                                                           "miss_ms_per_token": l.cost.miss_ms_per_token})})
            curve.extend({"layer": l.layer, **c} for c in l.curve)
        return {"prefetch": rows, "curve": curve}


def task_prediction(hidden: np.ndarray, rows: np.ndarray, doc_ids: np.ndarray, positions: np.ndarray,
                    routing: dict[int, np.ndarray], *, probe_layer: int, num_experts: int,
                    prefetch_size: int | None = None,
                    expert_bytes: dict[int, int] | None = None, bytes_source: str | None = None,
                    bandwidth_gbs: float = 25.0, test_fraction: float = 0.3, l2: float = 1e-3, steps: int = 200,
                    seed: int = 0, progress: Callable[[int], None] | None = None) -> TaskPrediction:
    """Predict, from the probe layer's hidden state, each later layer's experts (a prefetch set of m).

    One multi-label logistic probe (BCE, L2, L-BFGS) per target layer, trained on some documents and scored on
    held-out documents (a seeded split by document). Baselines: the m most loaded experts of the training
    documents, and the previous token's experts at the target layer (filled to m in the most-frequent order).

    Parameters
    ----------
    hidden : np.ndarray
        float [s, H], the router input at ``probe_layer`` at ``rows`` (e.g. ``trace.activations(P).hidden``).
    rows : np.ndarray
        int [s], those tokens' rows in the full trace arrays below.
    doc_ids, positions : np.ndarray
        int [T] of the whole trace (documents; 0 at each window start).
    routing : dict[int, np.ndarray]
        Target layer -> int [T, k] experts of the whole trace (layers after ``probe_layer``).
    probe_layer, num_experts : int
    prefetch_size : int, optional
        m (default k).
    expert_bytes : dict[int, int], optional
        Target layer -> bytes of one expert (for :class:`LayerCost`).
    bytes_source : str, optional
    bandwidth_gbs : float
        Host-to-device bandwidth, GB/s (1e9 bytes).
    test_fraction, l2, steps, seed
        As for :func:`~lazarus_core.analysis.attention_prediction.split_documents` / ``fit_linear_probe``.
    progress : callable, optional
        Called with the number of target layers done.

    Returns
    -------
    TaskPrediction

    Raises
    ------
    ValueError
        No target layer after the probe layer, a bad prefetch size or bandwidth (names the flag).
    """
    targets = sorted(l for l in routing if l > probe_layer)
    if not targets:
        raise ValueError(f"--probe-layer {probe_layer} has no later MoE layer to predict: choose an earlier one")
    if bandwidth_gbs <= 0:
        raise ValueError(f"--bandwidth-gbs must be > 0, got {bandwidth_gbs}")
    k = np.asarray(routing[targets[0]]).shape[1]
    m = k if prefetch_size is None else int(prefetch_size)
    if not 1 <= m <= num_experts:
        raise ValueError(f"--prefetch-size must be in 1..{num_experts} (the layer's experts), got {m}")
    rows = np.asarray(rows, np.int64)
    docs = np.asarray(doc_ids)[rows]
    test = split_documents(docs, test_fraction, seed)
    train = ~test
    x = np.asarray(hidden, np.float32)
    groups = docs[test]
    out = []
    for i, l in enumerate(targets):
        ids = np.asarray(routing[l], np.int64)
        y = ids[rows]
        labels = np.zeros((len(rows), num_experts), np.float32)
        np.put_along_axis(labels, y, 1.0, 1)
        probe = fit_linear_probe(x[train], labels[train], loss="sigmoid", l2=l2, steps=steps, seed=seed)
        freq = most_frequent_scores(y[train], num_experts)
        scores = {"probe": probe.scores(x[test]),
                  "most_frequent": np.broadcast_to(freq, (int(test.sum()), num_experts)),
                  "previous_token": previous_token_scores(ids, rows[test], positions, freq)}
        yt = y[test]
        prefetchers, recall_values = [], {}
        for name in PREFETCHERS:
            hits = prefetch_hits(ranked_sets(scores[name], m), yt).astype(np.float64)
            recall_values[name] = hits / k
            prefetchers.append(PrefetchScore(name, bootstrap_mean_ci(hits / m, groups, seed=seed),
                                             bootstrap_mean_ci(hits / k, groups, seed=seed)))
        best = max(("most_frequent", "previous_token"), key=lambda n: recall_values[n].mean())
        gain = bootstrap_mean_ci(recall_values["probe"] - recall_values[best], groups, seed=seed)
        order = {name: np.argsort(-scores[name], axis=1, kind="stable") for name in PREFETCHERS}
        curve = []
        for mm in range(1, num_experts + 1):
            curve.append({"m": mm, **{name: float((prefetch_hits(order[name][:, :mm], yt) / k).mean())
                                      for name in PREFETCHERS}})
        cost = None
        if expert_bytes is not None and l in expert_bytes:
            b = int(expert_bytes[l])
            per_ms = 1e3 / (bandwidth_gbs * 1e9)
            miss_probe = 1.0 - recall_values["probe"].mean()
            miss_freq = 1.0 - recall_values["most_frequent"].mean()
            cost = LayerCost(b, m * b, num_experts * b, 1.0 - m / num_experts, m * b * per_ms,
                             k * miss_probe * b * per_ms, k * miss_freq * b * per_ms)
        out.append(LayerTaskPrediction(l, m, num_experts, k, prefetchers, gain, best, curve, cost))
        if progress is not None:
            progress(i + 1)
    return TaskPrediction(probe_layer, out, int(train.sum()), int(test.sum()), len(np.unique(docs[train])),
                          len(np.unique(groups)), bandwidth_gbs, bytes_source, test_fraction, l2, steps, seed)


def expert_bytes_per_layer(model_spec: str, layers: Sequence[int], *, revision: str | None = None,
                           model=None, info=None) -> tuple[dict[int, int], str]:
    """Bytes of one routed expert per MoE layer: from the checkpoint's tensors as stored, else the loaded model.

    Parameters
    ----------
    model_spec : str
        ``-m`` (local directory, built-in alias or hub id).
    layers : sequence of int
    revision : str, optional
    model, info : optional
        The loaded model and its :class:`~lazarus_core.routing.locate.MoeModelInfo` (fallback when the
        checkpoint cannot be read: parameter bytes of the experts module in memory / E).

    Returns
    -------
    (dict[int, int], str)
        Layer -> bytes, and the source (``"checkpoint (as stored)"`` or ``"model in memory (<dtype>)"``).
    """
    try:
        from lazarus_core.models import open_moe_checkpoint
        from lazarus_core.overlay.sizes import expert_bytes_as_stored

        ckpt = open_moe_checkpoint(model_spec, revision=revision)
        try:
            stored = expert_bytes_as_stored(ckpt)
            e = ckpt.num_experts
        finally:
            ckpt.close()
        if all(stored.get(l, 0) > 0 for l in layers):
            return {l: int(stored[l] // e) for l in layers}, "checkpoint (as stored)"
    except Exception:                       # noqa: BLE001 - any unreadable checkpoint falls back to the model
        pass
    if model is None or info is None:
        return {}, "unknown"
    out, dtype = {}, None
    for l in layers:
        params = list(info.layers[l].experts.parameters())
        dtype = params[0].dtype if params else dtype
        out[l] = int(sum(p.numel() * p.element_size() for p in params) // info.layers[l].num_experts)
    return out, f"model in memory ({str(dtype).replace('torch.', '')})"
