"""Router entropy: how decisive each token's routing distribution is, against the layer's marginal and log E."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci

SCORINGS = ("softmax", "sigmoid")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DEFAULT_CHUNK_ROWS = 8192  # 8192 x 64 fp32 = 2 MiB per temporary: fits the caches, amortises torch's call overhead


# ------------------------------------------------------------------------------------------ arrays
def _as_tensor(array) -> torch.Tensor:
    """A torch view of a (possibly read-only, memory-mapped) array; never copies."""
    if isinstance(array, torch.Tensor):
        return array
    with warnings.catch_warnings():  # read-only memory maps: we only read them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(array))


def iter_fp32_chunks(array, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """Yield ``(start, chunk)``: float32 copies [c, E] of consecutive row blocks of ``array`` [t, E].

    One buffer is reused (``copy_`` into preallocated fp32 converts fp16 about 10x faster than
    ``.float()``, which allocates), so each chunk is valid until the next one is requested.
    """
    x_all = _as_tensor(array)
    n = x_all.shape[0]
    buf = torch.empty((min(chunk_rows, max(n, 1)), *x_all.shape[1:]), dtype=torch.float32)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        chunk = buf[: stop - start]
        chunk.copy_(x_all[start:stop])
        yield start, chunk


LOG2E = 1.4426950408889634  # torch's CPU exp2 is about twice as fast as its exp: work in base 2, convert at the end
LN2 = 0.6931471805599453


def entropy_from_logits(logits, *, scoring: str = "softmax", chunk_rows: int = DEFAULT_CHUNK_ROWS,
                        out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-token entropy of the router's distribution over all experts, from raw logits.

    One pass over the logits through the fused op :func:`lazarus_core.ops.router_entropy_rows`
    (``backend="auto"``: the compiled CPU kernel, or the CUDA one for CUDA tensors; chunked torch
    where neither is built); no float64 or full-size float32 copy of the array is made.

    Parameters
    ----------
    logits : np.ndarray or torch.Tensor
        float16 / bfloat16 / float32 [t, E], the raw router output (GPT-OSS: router bias included, as
        the trace stores it). Contiguous arrays (memory maps included) are read in place; others are
        copied once.
    scoring : {"softmax", "sigmoid"}
        ``softmax``: p = softmax(logits) over E (OLMoE, Mixtral, Qwen, DeepSeek-V2, GPT-OSS).
        ``sigmoid``: p = sigmoid(logits) / sum(sigmoid(logits)) (DeepSeek-V3's scores normalised
        to sum 1; the selection-only correction bias is not part of the distribution).
    chunk_rows : int
        Kept for callers of the chunked version; the fused op chooses its own row blocks.
    out : np.ndarray, optional
        float32 [t], where to write the entropies.

    Returns
    -------
    entropy : np.ndarray
        float32 [t], nats; between 0 (one expert gets everything) and log E (uniform).
    probability_sum : np.ndarray
        float64 [E], the probabilities summed over tokens (divide by t for the mean routing distribution).

    Raises
    ------
    ValueError
        Unknown ``scoring`` or logits that are not 2-D.
    """
    from lazarus_core.ops.router_entropy import router_entropy_rows

    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    x_all = _as_tensor(logits)
    if x_all.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {tuple(x_all.shape)}")
    n = x_all.shape[0]
    entropy = np.empty(n, dtype=np.float32) if out is None else out
    on_host = x_all.device.type == "cpu"
    target = torch.from_numpy(entropy) if on_host else None
    h, prob_sum = router_entropy_rows(x_all, scoring=scoring, out=target, backend="auto")
    if not on_host:
        entropy[:] = h.cpu().numpy()
    return entropy, prob_sum.cpu().numpy()


def topk_entropy(topk_weights, *, chunk_rows: int = 1 << 16) -> np.ndarray:
    """Per-token entropy of the top-k weights renormalised to sum 1.

    Parameters
    ----------
    topk_weights : np.ndarray
        float32 [t, k], the weights the model mixed with (any scale: OLMoE's rows sum to < 1,
        DeepSeek-V3's to its scaling factor); non-negative.

    Returns
    -------
    np.ndarray
        float32 [t], nats in [0, log k]; 0 for a row that sums to 0.
    """
    n = len(topk_weights)
    out = np.empty(n, dtype=np.float32)
    out_t = torch.from_numpy(out)
    with torch.inference_mode():
        for start, w in iter_fp32_chunks(topk_weights, chunk_rows):
            q = w.div_(w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
            out_t[start:start + len(w)] = -torch.special.xlogy(q, q).sum(dim=1)
    return out


def entropy_of(p: np.ndarray) -> float:
    """Entropy in nats of one distribution ``p`` (float [E], normalised here; 0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------- intervals
def document_index(doc_ids: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """(index of each token's document int64 [n], number of documents); one document when ``doc_ids`` is None."""
    if doc_ids is None:
        return np.zeros(n, dtype=np.int64), 1
    _, inverse = np.unique(np.asarray(doc_ids), return_inverse=True)
    return inverse.astype(np.int64), int(inverse.max()) + 1 if n else 0


class DocumentBootstrap:
    """A percentile bootstrap over documents, drawn once and shared by every statistic of one trace.

    The same scheme as :func:`lazarus_core.analysis.intervals.bootstrap_mean_ci` with ``groups`` (and
    the same numbers for the same seed): each replicate draws the documents with replacement, as
    multinomial counts, and recomputes the token-weighted mean from per-document sums. Drawing the
    counts once makes an interval cost one ``bincount`` per statistic instead of a fresh draw.
    With one document, tokens are resampled (``bootstrap-tokens``), through ``bootstrap_mean_ci``.

    Parameters
    ----------
    doc_index : np.ndarray
        int [n], each token's document in [0, n_docs) (from :func:`document_index`).
    n_docs : int
    n_boot : int
        Replicates.
    level : float
        Coverage.
    seed : int
    """

    def __init__(self, doc_index: np.ndarray, n_docs: int, *, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> None:
        self.doc_index, self.n_docs = np.asarray(doc_index), int(n_docs)
        self.n_boot, self.level, self.seed = int(n_boot), float(level), int(seed)
        self.tokens_per_doc = np.bincount(self.doc_index, minlength=self.n_docs).astype(np.float64)
        self._counts = None
        if self.n_docs >= 2:
            present = self.tokens_per_doc > 0
            self._present = present
            m = int(present.sum())
            rng = np.random.default_rng(self.seed)
            self._counts = rng.multinomial(m, np.full(m, 1.0 / m), size=self.n_boot).astype(np.float64)

    def _interval(self, sum_v: np.ndarray, sum_w: np.ndarray) -> Interval:
        estimate = float(sum_v.sum() / sum_w.sum()) if sum_w.sum() > 0 else float("nan")
        num, den = self._counts @ sum_v, self._counts @ sum_w
        reps = np.divide(num, den, out=np.full(self.n_boot, np.nan), where=den > 0)
        alpha = (1.0 - self.level) / 2.0
        low, high = np.nanquantile(reps, [alpha, 1.0 - alpha])
        return Interval(estimate, float(low), float(high), self.level, "bootstrap-documents", len(sum_v))

    def mean(self, values: np.ndarray, weights: np.ndarray | None = None) -> Interval:
        """(Weighted) mean of ``values`` (float [n], one per token) with its interval."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if self._counts is None:
            return bootstrap_mean_ci(values, None, weights=weights, n_boot=self.n_boot, level=self.level,
                                     seed=self.seed)
        w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        sum_v = np.bincount(self.doc_index, weights=values if w is None else values * w, minlength=self.n_docs)
        sum_w = self.tokens_per_doc if w is None else np.bincount(self.doc_index, weights=w, minlength=self.n_docs)
        return self._interval(sum_v[self._present], sum_w[self._present])

    def ratio_columns(self, numerators: np.ndarray, denominators: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of ``sum(num[:, c]) / sum(den)`` per column from per-document totals (num [n_docs, C], den [n_docs]).

        With one document the bounds equal the estimate (no interval can be formed over documents).
        """
        numerators = np.asarray(numerators, dtype=np.float64)
        denominators = np.asarray(denominators, dtype=np.float64)
        if self._counts is None:
            value = numerators.sum(0) / max(denominators.sum(), 1e-300)
            return value, value
        return bootstrap_ratio_columns(self._counts, numerators[self._present], denominators[self._present],
                                       level=self.level)

    def ratio(self, numerators: np.ndarray, denominators: np.ndarray) -> Interval:
        """Interval of ``sum(numerators) / sum(denominators)`` from per-document totals (float [n_docs] each)."""
        numerators = np.asarray(numerators, dtype=np.float64)
        denominators = np.asarray(denominators, dtype=np.float64)
        if self._counts is None:
            value = float(numerators.sum() / denominators.sum()) if denominators.sum() > 0 else float("nan")
            return Interval(value, value, value, self.level, "none (one document)", 1)
        return self._interval(numerators[self._present], denominators[self._present])


def bootstrap_ratio_columns(counts: np.ndarray, numerators: np.ndarray, denominators: np.ndarray, *,
                            level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of ``sum_g num[g, c] / sum_g den[g]`` for every column c, from replicate counts.

    Parameters
    ----------
    counts : np.ndarray
        float [B, G], how often each of G units is drawn in each of B replicates (multinomial).
    numerators : np.ndarray
        float [G, C], per-unit totals.
    denominators : np.ndarray
        float [G], per-unit totals.

    Returns
    -------
    (np.ndarray, np.ndarray)
        float64 [C] lower and upper bounds.
    """
    num = counts @ np.asarray(numerators, dtype=np.float64)
    den = counts @ np.asarray(denominators, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = num / den[:, None]
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(reps, [alpha, 1.0 - alpha], axis=0)
    return low, high


def document_mean_ci(values: np.ndarray, doc_index: np.ndarray, n_docs: int, *, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95) -> Interval:
    """Token-weighted mean of ``values`` (float [n]) with a bootstrap interval over documents (one-off use)."""
    return DocumentBootstrap(doc_index, n_docs, n_boot=n_boot, level=level, seed=seed).mean(values)


# ---------------------------------------------------------------------------------------- results
@dataclass
class Histogram:
    """Counts of values in fixed bins.

    Attributes
    ----------
    edges : list of float
        [bins + 1] bin edges (the last bin includes its right edge).
    counts : list of int
        [bins] number of values per bin.
    """

    edges: list[float]
    counts: list[int]

    @classmethod
    def of(cls, values: np.ndarray, low: float, high: float, bins: int) -> "Histogram":
        v = _as_tensor(np.ascontiguousarray(values, dtype=np.float32))
        counts = torch.histc(v, bins=bins, min=low, max=high) if len(v) else torch.zeros(bins)
        return cls(np.linspace(low, high, bins + 1).tolist(), [int(c) for c in counts.tolist()])

    def to_dict(self) -> dict:
        return {"edges": [round(e, 6) for e in self.edges], "counts": self.counts}


@dataclass
class EntropySummary:
    """One per-token entropy over a layer: mean with its document interval, quantiles, histogram.

    Attributes
    ----------
    mean_nats : Interval
        Token-weighted mean with a 95% bootstrap interval over documents.
    max_nats : float
        The largest possible value (log E for the router, log k for the top-k weights): the uniform baseline.
    quantiles : dict[float, float]
        Nats at each of :data:`QUANTILES`.
    histogram : Histogram
        Over [0, max_nats].
    """

    mean_nats: Interval
    max_nats: float
    quantiles: dict[float, float]
    histogram: Histogram

    @property
    def mean_normalized(self) -> float:
        """Mean divided by ``max_nats`` (1 = uniform, 0 = one expert); NaN when max_nats is 0."""
        return self.mean_nats.estimate / self.max_nats if self.max_nats > 0 else float("nan")

    @classmethod
    def of(cls, values: np.ndarray, max_nats: float, boot: DocumentBootstrap, *, bins: int) -> "EntropySummary":
        q = np.quantile(values, QUANTILES) if len(values) else np.full(len(QUANTILES), np.nan)
        return cls(boot.mean(values), float(max_nats),
                   {float(a): float(b) for a, b in zip(QUANTILES, q)},
                   Histogram.of(values, 0.0, max(float(max_nats), 1e-6), bins))

    def to_dict(self) -> dict:
        return {"mean_nats": self.mean_nats.to_dict(), "mean_normalized": round(self.mean_normalized, 8),
                "max_nats": self.max_nats, "quantiles": {str(k): round(v, 6) for k, v in self.quantiles.items()},
                "histogram": self.histogram.to_dict()}


@dataclass
class LayerEntropy:
    """Router entropy of one MoE layer.

    Attributes
    ----------
    layer : int
        Model layer index.
    num_tokens, num_experts, top_k : int
    router : EntropySummary
        Per-token entropy of the router's distribution over all E experts (family convention).
    topk : EntropySummary
        Per-token entropy of the renormalised top-k weights (max log k).
    mean_probability : list of float
        [E] the layer's mean routing distribution (mean over tokens of each token's probabilities).
    marginal_entropy_nats : float
        Entropy of ``mean_probability``: what the per-token entropy would be if every token were
        routed by the layer's average distribution. ``marginal - mean`` (the mutual information
        between token and expert, >= 0) is how much routing depends on the token.
    """

    layer: int
    num_tokens: int
    num_experts: int
    top_k: int
    router: EntropySummary
    topk: EntropySummary
    mean_probability: list[float]
    marginal_entropy_nats: float

    @property
    def mean_entropy_nats(self) -> float:
        return self.router.mean_nats.estimate

    @property
    def max_entropy_nats(self) -> float:
        return self.router.max_nats

    @property
    def mutual_information_nats(self) -> float:
        """Marginal entropy minus mean per-token entropy (0 when every token has the same distribution)."""
        return self.marginal_entropy_nats - self.mean_entropy_nats

    def to_dict(self) -> dict:
        return {
            "layer": self.layer, "num_tokens": self.num_tokens, "num_experts": self.num_experts, "top_k": self.top_k,
            "mean_entropy_nats": round(self.mean_entropy_nats, 8),
            "mean_entropy_ci": self.router.mean_nats.to_dict(),
            "mean_normalized_entropy": round(self.router.mean_normalized, 8),
            "marginal_entropy_nats": round(self.marginal_entropy_nats, 8),
            "max_entropy_nats": round(self.max_entropy_nats, 8),
            "mutual_information_nats": round(self.mutual_information_nats, 8),
            "entropy_quantiles_nats": {str(k): round(v, 6) for k, v in self.router.quantiles.items()},
            "entropy_histogram": self.router.histogram.to_dict(),
            "topk_mean_entropy_nats": round(self.topk.mean_nats.estimate, 8),
            "topk_mean_entropy_ci": self.topk.mean_nats.to_dict(),
            "topk_mean_normalized_entropy": round(self.topk.mean_normalized, 8),
            "topk_max_entropy_nats": round(self.topk.max_nats, 8),
            "topk_entropy_quantiles_nats": {str(k): round(v, 6) for k, v in self.topk.quantiles.items()},
            "topk_entropy_histogram": self.topk.histogram.to_dict(),
            "mean_probability": [round(p, 8) for p in self.mean_probability],
        }


@dataclass
class RouterEntropy:
    """Router entropy of every requested layer of a trace.

    Attributes
    ----------
    family : str or None
    scoring : {"softmax", "sigmoid"}
        The probability convention the entropies were computed in.
    num_tokens : int
    layers : list of LayerEntropy
    token_entropy : dict[int, (np.ndarray, np.ndarray)]
        Per layer, the per-token entropies (router float32 [t], top-k float32 [t]) when asked for
        (``keep_tokens=True``); not part of :meth:`to_dict`.
    """

    family: str | None
    scoring: str
    num_tokens: int
    layers: list[LayerEntropy]
    token_entropy: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def layer(self, layer: int) -> LayerEntropy:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise ValueError(f"layer {layer} was not analysed; the layers are {[e.layer for e in self.layers]}")

    def to_dict(self) -> dict:
        return {"family": self.family, "scoring": self.scoring, "num_tokens": self.num_tokens,
                "baselines": {"max_entropy_nats": "log E (a uniform router)",
                              "marginal_entropy_nats": "entropy of the layer's mean routing distribution",
                              "topk_max_entropy_nats": "log k (equal top-k weights)"},
                "layers": [entry.to_dict() for entry in self.layers]}


# ---------------------------------------------------------------------------------------- analyses
def layer_entropy(logits, topk_weights, doc_ids: np.ndarray | None = None, *, layer: int = 0,
                  scoring: str = "softmax", bins: int = 50, n_boot: int = 1000, seed: int = 0,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[LayerEntropy, np.ndarray, np.ndarray]:
    """Router entropy of one layer from arrays (no trace needed).

    Parameters
    ----------
    logits : np.ndarray
        float16 / float32 [t, E], raw router output.
    topk_weights : np.ndarray
        float32 [t, k], the mixing weights.
    doc_ids : np.ndarray, optional
        int [t], document of each token (the bootstrap unit); None: tokens are resampled.
    layer : int
        Recorded in the result.
    scoring : {"softmax", "sigmoid"}
        See :func:`entropy_from_logits`.
    bins : int
        Histogram bins over [0, max].
    n_boot, seed : int
        Bootstrap replicates and seed.

    Returns
    -------
    (LayerEntropy, np.ndarray, np.ndarray)
        The summary and the per-token router and top-k entropies (float32 [t] each).
    """
    return _summarise([(logits, topk_weights)], doc_ids, len(topk_weights), layer=layer, scoring=scoring,
                      bins=bins, n_boot=n_boot, seed=seed, chunk_rows=chunk_rows)


def _summarise(parts: Iterable[tuple[np.ndarray, np.ndarray]], doc_ids, n: int, *, layer: int, scoring: str,
               bins: int, n_boot: int, seed: int, chunk_rows: int,
               boot: DocumentBootstrap | None = None) -> tuple[LayerEntropy, np.ndarray, np.ndarray]:
    router = np.empty(n, dtype=np.float32)
    topk = np.empty(n, dtype=np.float32)
    prob_sum, offset, num_experts, k = None, 0, 0, 0
    for logits, weights in parts:
        t = len(weights)
        _, p = entropy_from_logits(logits, scoring=scoring, chunk_rows=chunk_rows, out=router[offset:offset + t])
        topk[offset:offset + t] = topk_entropy(weights)
        prob_sum = p if prob_sum is None else prob_sum + p
        num_experts, k = int(np.shape(logits)[1]), int(np.shape(weights)[1])
        offset += t
    if offset != n:
        raise ValueError(f"expected {n} tokens, got {offset}")
    if boot is None:
        boot = DocumentBootstrap(*document_index(doc_ids, n), n_boot=n_boot, seed=seed)
    mean_p = prob_sum / max(n, 1)
    summary = LayerEntropy(
        int(layer), int(n), num_experts, k,
        EntropySummary.of(router, math.log(num_experts), boot, bins=bins),
        EntropySummary.of(topk, math.log(k) if k else 0.0, boot, bins=bins),
        mean_p.tolist(), entropy_of(mean_p))
    return summary, router, topk


def trace_scoring(trace) -> str:
    """The probability convention of a trace's router (``softmax`` or ``sigmoid``) from ``weight_convention``.

    Raises
    ------
    ValueError
        A scoring this module does not know.
    """
    scoring = (trace.meta.get("weight_convention") or {}).get("scoring", "softmax")
    if scoring not in SCORINGS:
        raise ValueError(f"the trace {trace.path} has router scoring {scoring!r}; router entropy knows {SCORINGS}")
    return scoring


def require_logits(trace) -> None:
    """Raise a one-line ValueError naming ``--logits`` when ``trace`` stores no router logits."""
    if not trace.has_logits:
        raise ValueError(f"the trace {trace.path} has no router logits: recapture it with "
                         "`lazarus capture ... --logits`")


def check_layers(trace, layers: Sequence[int] | None) -> list[int]:
    """``layers`` (default: every captured layer), each checked against the trace's captured layers."""
    chosen = list(trace.layers) if layers is None else [int(l) for l in layers]
    bad = [l for l in chosen if l not in trace.layers]
    if bad:
        raise ValueError(f"layers {bad} are not in the trace {trace.path}; its layers are {list(trace.layers)}")
    return chosen


def router_entropy(trace, layers: Sequence[int] | None = None, *, bins: int = 50, n_boot: int = 1000,
                   seed: int = 0, keep_tokens: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> RouterEntropy:
    """Per-token router entropy (all experts, family convention) and top-k weight entropy per layer.

    Reads the trace shard by shard (bounded memory). The convention comes from
    ``trace.meta["weight_convention"]["scoring"]``: softmax over E, or DeepSeek-V3's sigmoid scores
    normalised to sum 1; GPT-OSS logits in a trace already include the router bias.

    Parameters
    ----------
    trace : lazarus_core.routing.Trace
        Captured with logits (``lazarus capture --logits``).
    layers : sequence of int, optional
        Model layer indices (default: every captured layer).
    bins : int
        Histogram bins.
    n_boot, seed : int
        Bootstrap over documents.
    keep_tokens : bool
        Keep the per-token entropies in ``RouterEntropy.token_entropy``.

    Returns
    -------
    RouterEntropy

    Raises
    ------
    ValueError
        The trace has no logits (the message names ``--logits``), or a layer is not in the trace.
    """
    require_logits(trace)
    chosen = check_layers(trace, layers)
    scoring = trace_scoring(trace)
    boot = DocumentBootstrap(*document_index(trace.doc_ids, trace.num_tokens), n_boot=n_boot, seed=seed)
    results, per_token = [], {}
    for layer in chosen:
        parts = ((shard.layer(layer).logits, shard.layer(layer).topk_weights) for shard in trace.shards())
        summary, router, topk = _summarise(parts, None, trace.num_tokens, layer=layer, scoring=scoring, bins=bins,
                                           n_boot=n_boot, seed=seed, chunk_rows=chunk_rows, boot=boot)
        results.append(summary)
        if keep_tokens:
            per_token[layer] = (router, topk)
    return RouterEntropy(trace.meta.get("family"), scoring, trace.num_tokens, results, per_token)
