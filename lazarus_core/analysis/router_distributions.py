"""Router output distributions per layer: raw logits, probabilities and renormalised top-k weights (three views)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from lazarus_core.analysis.intervals import Interval
from lazarus_core.analysis.router_entropy import (
    DEFAULT_CHUNK_ROWS,
    LOG2E,
    SCORINGS,
    Histogram,
    _as_tensor,
    check_layers,
    document_index,
    DocumentBootstrap,
    iter_fp32_chunks,
    require_logits,
    trace_scoring,
)

DEFAULT_HISTOGRAM_TOKENS = 65536  # histograms count a sample: binning 64M values costs seconds and shows nothing more
LOG10_FLOOR = -8.0  # probabilities below 1e-8 land in the first bin of the log view


@dataclass
class LayerDistributions:
    """The router's outputs at one layer, in three views, with their uniform baselines.

    Attributes
    ----------
    layer, num_tokens, num_experts, top_k : int
    scoring : {"softmax", "sigmoid"}
        How logits became probabilities (DeepSeek-V3: sigmoid scores normalised to sum 1).
    histogram_tokens : int
        Tokens whose values the histograms count (a seeded uniform sample when fewer than
        ``num_tokens``; every other statistic uses every token).
    logits : Histogram
        Raw router logits (every token x expert), over [min, max] of the layer.
    logit_mean, logit_std : float
    probabilities : Histogram
        Router probabilities over all E experts (every token x expert), over [0, 1]; baseline 1/E.
    log10_probabilities : Histogram
        The same on a log10 scale over [-8, 0] (values below 1e-8 counted in the first bin).
    topk_probabilities : Histogram
        The top-k weights renormalised to sum 1 per token (every token x slot), over [0, 1]; baseline 1/k.
    probability_per_rank : list of Interval
        [k] mean router probability (all-E distribution) of the expert in each top-k slot of the trace
        (slot 0 = primary; the slots are in logit order, so for every family but DeepSeek, whose
        selection is group-limited and biased, this is the r-th largest probability), with a document
        bootstrap interval; baseline ``uniform_probability`` = 1/E.
    topk_weight_per_rank : list of Interval
        [k] mean renormalised top-k weight at each slot (slot 0 = primary); baseline 1/k.
    topk_mass : Interval
        Mean router probability held by the k selected experts; baseline k/E.
    """

    layer: int
    num_tokens: int
    num_experts: int
    top_k: int
    scoring: str
    histogram_tokens: int
    logits: Histogram
    logit_mean: float
    logit_std: float
    probabilities: Histogram
    log10_probabilities: Histogram
    topk_probabilities: Histogram
    probability_per_rank: list[Interval]
    topk_weight_per_rank: list[Interval]
    topk_mass: Interval

    @property
    def uniform_probability(self) -> float:
        return 1.0 / self.num_experts

    def to_dict(self) -> dict:
        return {
            "layer": self.layer, "num_tokens": self.num_tokens, "num_experts": self.num_experts, "top_k": self.top_k,
            "scoring": self.scoring, "histogram_tokens": self.histogram_tokens,
            "logits": dict(self.logits.to_dict(), mean=round(self.logit_mean, 6), std=round(self.logit_std, 6)),
            "probabilities": self.probabilities.to_dict(),
            "log10_probabilities": self.log10_probabilities.to_dict(),
            "topk_probabilities": self.topk_probabilities.to_dict(),
            "mean_probability_per_rank": [round(i.estimate, 8) for i in self.probability_per_rank],
            "mean_probability_per_rank_ci": [i.to_dict() for i in self.probability_per_rank],
            "mean_topk_weight_per_rank": [round(i.estimate, 8) for i in self.topk_weight_per_rank],
            "mean_topk_weight_per_rank_ci": [i.to_dict() for i in self.topk_weight_per_rank],
            "topk_mass": self.topk_mass.to_dict(),
            "baselines": {"uniform_probability": 1.0 / self.num_experts, "uniform_topk_weight": 1.0 / self.top_k,
                          "uniform_topk_mass": self.top_k / self.num_experts},
        }


@dataclass
class RouterDistributions:
    """:class:`LayerDistributions` of every requested layer of a trace."""

    family: str | None
    scoring: str
    num_tokens: int
    layers: list[LayerDistributions]

    def layer(self, layer: int) -> LayerDistributions:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise ValueError(f"layer {layer} was not analysed; the layers are {[e.layer for e in self.layers]}")

    def to_dict(self) -> dict:
        return {"family": self.family, "scoring": self.scoring, "num_tokens": self.num_tokens,
                "layers": [entry.to_dict() for entry in self.layers]}


def _histogram_rows(n: int, sample_tokens: int | None, seed: int) -> np.ndarray | None:
    """bool [n]: the tokens whose values enter the histograms (None: all of them)."""
    if sample_tokens is None or sample_tokens >= n:
        return None
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=sample_tokens, replace=False)] = True
    return mask


def _distributions(parts: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int,
                   boot: DocumentBootstrap, *, layer: int, scoring: str, bins: int, n_boot: int, seed: int,
                   sample_tokens: int | None, chunk_rows: int) -> LayerDistributions:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    parts = list(parts)
    if not parts or n == 0:
        raise ValueError("router distributions need at least one token")
    num_experts, k = int(np.shape(parts[0][0])[1]), int(np.shape(parts[0][1])[1])
    in_hist = _histogram_rows(n, sample_tokens, seed)
    n_hist = n if in_hist is None else int(in_hist.sum())
    # One pass: every token's slot probabilities and logit moments; the sampled tokens' logits and
    # probabilities are kept (n_hist x E fp32 each) and binned at the end, once the range is known.
    kept_logits = torch.empty((n_hist, num_experts), dtype=torch.float32)
    kept_probs = torch.empty_like(kept_logits)
    kept_weights = torch.empty((n_hist, k), dtype=torch.float32)
    lo, hi, total, total_sq = math.inf, -math.inf, 0.0, 0.0
    slot_prob = np.empty((n, k), dtype=np.float32)
    slot_weight = np.empty((n, k), dtype=np.float32)
    offset = kept = 0
    with torch.inference_mode():
        for logits, ids, weights in parts:
            ids_t = _as_tensor(ids).long()
            weight_chunks = iter_fp32_chunks(weights, chunk_rows)
            for start, x in iter_fp32_chunks(logits, chunk_rows):
                rows = len(x)
                _, w = next(weight_chunks)
                keep = None if in_hist is None else torch.from_numpy(in_hist[offset:offset + rows])
                sample = x if keep is None else x[keep]
                kept_logits[kept:kept + len(sample)] = sample
                a, b = torch.aminmax(x)
                lo, hi = min(lo, float(a)), max(hi, float(b))
                total += float(x.sum(dim=1).double().sum())
                total_sq += float(x.square().sum(dim=1).double().sum())
                if scoring == "softmax":      # unnormalised scores e, then p = e / sum(e) where needed
                    x.sub_(x.amax(dim=1, keepdim=True)).mul_(LOG2E).exp2_()
                else:
                    x.sigmoid_()
                inv_sum = x.sum(dim=1, keepdim=True).reciprocal_()
                slot_prob[offset:offset + rows] = (x.gather(1, ids_t[start:start + rows]) * inv_sum).numpy()
                kept_probs[kept:kept + len(sample)] = (x if keep is None else x[keep]) * (
                    inv_sum if keep is None else inv_sum[keep])
                q = w.div_(w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
                slot_weight[offset:offset + rows] = q.numpy()
                kept_weights[kept:kept + len(sample)] = q if keep is None else q[keep]
                kept += len(sample)
                offset += rows
        hi = hi if hi > lo else lo + 1.0
        h_logits = torch.histc(kept_logits, bins=bins, min=lo, max=hi)
        h_prob = torch.histc(kept_probs, bins=bins, min=0.0, max=1.0)
        h_log = torch.histc(kept_probs.clamp_(min=10.0 ** LOG10_FLOOR).log10_(), bins=bins, min=LOG10_FLOOR, max=0.0)
        h_topk = torch.histc(kept_weights, bins=bins, min=0.0, max=1.0)
    mean = total / (n * num_experts)
    std = math.sqrt(max(total_sq / (n * num_experts) - mean * mean, 0.0))
    if offset != n:
        raise ValueError(f"expected {n} tokens, got {offset}")
    ci = boot.mean

    def hist(counts, low, high):
        return Histogram(np.linspace(low, high, bins + 1).tolist(), [int(round(c)) for c in counts.tolist()])

    return LayerDistributions(
        int(layer), int(n), num_experts, k, scoring, n_hist,
        hist(h_logits, lo, hi), mean, std, hist(h_prob, 0.0, 1.0), hist(h_log, LOG10_FLOOR, 0.0),
        hist(h_topk, 0.0, 1.0), [ci(slot_prob[:, r]) for r in range(k)], [ci(slot_weight[:, r]) for r in range(k)],
        ci(slot_prob.sum(axis=1)))


def layer_distributions(logits, topk_ids, topk_weights, doc_ids: np.ndarray | None = None, *, layer: int = 0,
                        scoring: str = "softmax", bins: int = 50, n_boot: int = 1000, seed: int = 0,
                        sample_tokens: int | None = DEFAULT_HISTOGRAM_TOKENS,
                        chunk_rows: int = DEFAULT_CHUNK_ROWS) -> LayerDistributions:
    """The three views of one layer's router output, from arrays.

    Parameters
    ----------
    logits : np.ndarray
        float16 / float32 [t, E], raw router output.
    topk_ids : np.ndarray
        int [t, k], the selected experts in the trace's order (by weight, descending).
    topk_weights : np.ndarray
        float32 [t, k], the mixing weights (renormalised here per token).
    doc_ids : np.ndarray, optional
        int [t], documents (bootstrap unit); None: tokens are resampled.
    scoring : {"softmax", "sigmoid"}
        Softmax over E, or DeepSeek-V3's sigmoid scores normalised to sum 1.
    bins : int
        Bins of every histogram.
    sample_tokens : int, optional
        Tokens (seeded uniform sample) whose values the histograms count; None: every token.

    Returns
    -------
    LayerDistributions
    """
    n = len(topk_weights)
    boot = DocumentBootstrap(*document_index(doc_ids, n), n_boot=n_boot, seed=seed)
    return _distributions([(logits, topk_ids, topk_weights)], n, boot, layer=layer,
                          scoring=scoring, bins=bins, n_boot=n_boot, seed=seed, sample_tokens=sample_tokens,
                          chunk_rows=chunk_rows)


def router_distributions(trace, layers: Sequence[int] | None = None, *, bins: int = 50, n_boot: int = 1000,
                         seed: int = 0, sample_tokens: int | None = DEFAULT_HISTOGRAM_TOKENS,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> RouterDistributions:
    """Histograms of raw logits, probabilities and renormalised top-k weights, and the mean probability per slot.

    Parameters
    ----------
    trace : lazarus_core.routing.Trace
        Captured with ``--logits``.
    layers : sequence of int, optional
        Model layer indices (default: every captured layer).
    bins, n_boot, seed : int
        Histogram bins; bootstrap over documents and the histogram sample.
    sample_tokens : int, optional
        Tokens the histograms count (seeded uniform sample; None: all).

    Returns
    -------
    RouterDistributions

    Raises
    ------
    ValueError
        No logits in the trace (names ``--logits``), or a layer not in the trace.
    """
    require_logits(trace)
    chosen = check_layers(trace, layers)
    scoring = trace_scoring(trace)
    boot = DocumentBootstrap(*document_index(trace.doc_ids, trace.num_tokens), n_boot=n_boot, seed=seed)
    out = []
    for layer in chosen:
        parts = [(s.layer(layer).logits, s.layer(layer).topk_ids, s.layer(layer).topk_weights) for s in trace.shards()]
        out.append(_distributions(parts, trace.num_tokens, boot, layer=layer, scoring=scoring, bins=bins,
                                  n_boot=n_boot, seed=seed, sample_tokens=sample_tokens, chunk_rows=chunk_rows))
    return RouterDistributions(trace.meta.get("family"), scoring, trace.num_tokens, out)
