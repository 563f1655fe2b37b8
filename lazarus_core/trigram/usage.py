"""Expert load, co-activation within a token's top-k, and routing-weight statistics, from trace arrays."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lazarus_core.trigram.stats import topk_pair_null


@dataclass
class ExpertPair:
    """Experts ``a`` and ``b`` chosen together for ``count`` tokens; ``expected`` if chosen independently.

    ``expected`` is exact for k distinct picks per token given the experts' loads
    (:func:`lazarus_core.trigram.stats.topk_pair_null`), so uniformly random routing gives lift about 1.
    """

    a: int
    b: int
    count: int
    expected: float
    lift: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerUsage:
    """Load and co-activation of one layer.

    Attributes
    ----------
    load : list of float
        Fraction of tokens routed to each expert (any slot); sums to k.
    primary_load : list of float
        Fraction of tokens whose primary expert it is; sums to 1.
    load_entropy_bits, max_entropy_bits : float
        Entropy of the normalised load, and ``log2 E``.
    cold_experts : list of int
        Experts with load below ``cold_threshold`` times the uniform load ``k / E``.
    top_pairs : list of ExpertPair
        Pairs most over-represented relative to independence (with at least ``min_count`` tokens).
    """

    layer: int
    num_tokens: int
    load: list[float]
    primary_load: list[float]
    load_entropy_bits: float
    max_entropy_bits: float
    cold_experts: list[int]
    top_pairs: list[ExpertPair] = field(default_factory=list)
    coactivation: list[list[int]] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top_pairs"] = [p.to_dict() for p in self.top_pairs]
        return d


def coactivation_matrix(topk_ids: np.ndarray, num_experts: int, chunk: int = 1 << 16) -> np.ndarray:
    """int64 [E, E]: tokens that chose both experts (diagonal: tokens that chose the expert).

    Parameters
    ----------
    topk_ids : np.ndarray
        int [N, k], distinct experts per row.

    Notes
    -----
    The one-hot products go through torch's matmul: numpy's BLAS thread pool and torch's OpenMP pool
    fight in one process on a small machine (3-6x slower). Each chunk's counts (<= 2^16) are exact in
    float32; chunks are summed in int64.
    """
    import torch

    out = torch.zeros((num_experts, num_experts), dtype=torch.int64)
    for start in range(0, len(topk_ids), chunk):
        ids = torch.from_numpy(np.ascontiguousarray(topk_ids[start:start + chunk], dtype=np.int64))
        onehot = torch.zeros((ids.shape[0], num_experts), dtype=torch.float32)
        onehot.scatter_(1, ids, 1.0)
        out += torch.round(onehot.T @ onehot).to(torch.int64)
    return out.numpy()


def layer_usage(topk_ids: np.ndarray, num_experts: int, *, layer: int, cold_threshold: float = 0.1,
                min_count: int = 5, top_pairs: int = 10, keep_matrix: bool = False) -> LayerUsage:
    """Load, entropy, cold experts and the most over-represented co-activated pairs of one layer.

    Parameters
    ----------
    topk_ids : np.ndarray
        int [N, k].
    num_experts : int
    layer : int
    cold_threshold : float
        Cold = load below this fraction of the uniform load.
    min_count : int
        Pairs seen fewer times are not ranked.
    top_pairs : int
    keep_matrix : bool
        Include the full co-activation matrix in the result.
    """
    ids = np.asarray(topk_ids)
    n, k = ids.shape
    co = coactivation_matrix(ids, num_experts)
    load = np.diag(co) / max(n, 1)
    primary = np.bincount(ids[:, 0], minlength=num_experts) / max(n, 1)
    p = load / max(load.sum(), 1e-12)
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    cold = [int(e) for e in np.flatnonzero(load < cold_threshold * k / num_experts)]
    iu, ju = np.triu_indices(num_experts, 1)
    counts = co[iu, ju]
    pair = topk_pair_null(load, k) if n > 0 and k > 1 else np.zeros((num_experts, num_experts))
    expected = n * pair[iu, ju]
    lift = np.where(expected > 0, counts / np.where(expected > 0, expected, 1), 0.0)
    ok = counts >= min_count
    order = [i for i in np.lexsort((-counts, -lift)) if ok[i]][:top_pairs]
    pairs = [ExpertPair(int(iu[i]), int(ju[i]), int(counts[i]), float(expected[i]), float(lift[i])) for i in order]
    return LayerUsage(int(layer), int(n), load.tolist(), primary.tolist(), entropy, float(np.log2(num_experts)), cold,
                      pairs, co.tolist() if keep_matrix else None)


@dataclass
class LayerWeights:
    """Routing weights of one layer.

    Attributes
    ----------
    rank_mean, rank_std : list of float
        Mean and std of the weight in each top-k slot (slot 0 = primary).
    row_sum_mean : float
        Mean of each token's summed top-k weights (< 1 for OLMoE, which does not renormalise; 1 for
        softmax-over-k families; the scaling factor for DeepSeek-V3).
    primary_margin_mean : float
        Mean of (weight of slot 0 - weight of slot 1): how decisive the router is.
    expert_mean_weight : list of float
        Mean weight of each expert when selected (NaN if never).
    """

    layer: int
    rank_mean: list[float]
    rank_std: list[float]
    row_sum_mean: float
    row_sum_std: float
    primary_margin_mean: float
    expert_mean_weight: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def layer_weights(topk_ids: np.ndarray, topk_weights: np.ndarray, num_experts: int, *, layer: int) -> LayerWeights:
    """Weight statistics of one layer (``topk_ids`` int [N, k], ``topk_weights`` float32 [N, k], sorted descending)."""
    ids = np.asarray(topk_ids)
    w = np.asarray(topk_weights, dtype=np.float64)
    sums = w.sum(1)
    per_expert = np.bincount(ids.reshape(-1), weights=w.reshape(-1), minlength=num_experts)
    counts = np.bincount(ids.reshape(-1), minlength=num_experts)
    mean_w = np.where(counts > 0, per_expert / np.maximum(counts, 1), np.nan)
    margin = float((w[:, 0] - w[:, 1]).mean()) if w.shape[1] > 1 and len(w) else float("nan")
    return LayerWeights(int(layer), w.mean(0).tolist(), w.std(0).tolist(), float(sums.mean()), float(sums.std()),
                        margin, mean_w.tolist())
