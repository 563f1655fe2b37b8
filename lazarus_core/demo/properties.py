"""Measurements the built-in models are shipped with: expert-delta spectra, routing balance, unigram perplexity.

Plain numpy on weights as they are stored on disk, so the numbers in each model card describe the
shipped files. (The tests re-implement these checks independently.)
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np


def energy_rank(matrix: np.ndarray, energy: float = 0.95) -> int:
    """Smallest number of singular values whose squares hold ``energy`` of the total (0 for a zero matrix)."""
    s2 = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False) ** 2
    total = s2.sum()
    if total == 0.0:
        return 0
    return int(np.searchsorted(np.cumsum(s2) / total, energy) + 1)


def delta_rank_summary(experts: np.ndarray, energy: float = 0.95) -> dict:
    """95%-energy ranks of ``W_e - mean_e(W_e)`` for one projection.

    Parameters
    ----------
    experts : np.ndarray
        float ``[E, out, in]``.

    Returns
    -------
    dict
        ``ranks`` per expert, ``median``, ``max_rank`` (min(out, in)) and ``median_fraction``.
    """
    w = np.asarray(experts, dtype=np.float64)
    delta = w - w.mean(axis=0, keepdims=True)
    ranks = [energy_rank(d, energy) for d in delta]
    max_rank = min(w.shape[1], w.shape[2])
    median = float(np.median(ranks))
    return {"ranks": ranks, "median": median, "max_rank": max_rank, "median_fraction": median / max_rank}


def routing_balance(topk_ids: np.ndarray, num_experts: int) -> dict:
    """Share of top-k assignments per expert and the fraction of experts above a quarter of uniform.

    Parameters
    ----------
    topk_ids : np.ndarray
        int ``[tokens, k]`` expert ids chosen for each token in one layer.
    """
    counts = np.bincount(np.asarray(topk_ids).reshape(-1), minlength=num_experts).astype(np.float64)
    share = counts / counts.sum()
    uniform = 1.0 / num_experts
    above = float((share >= uniform / 4).mean())
    return {"share": share.round(4).tolist(), "fraction_above_quarter_uniform": above,
            "min_share": float(share.min()), "max_share": float(share.max())}


def unigram_perplexity(train_ids: list[int] | np.ndarray, eval_ids: list[int] | np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on ``train_ids``, on ``eval_ids``."""
    counts = Counter(int(t) for t in train_ids)
    total = sum(counts.values()) + vocab_size
    nll = -sum(math.log((counts.get(int(t), 0) + 1) / total) for t in eval_ids) / max(len(eval_ids), 1)
    return math.exp(nll)
