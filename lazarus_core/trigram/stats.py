"""Exact tail probabilities without SciPy (binomial via the regularised incomplete beta, chi-square via torch) and BH q-values."""

from __future__ import annotations

import math

import numpy as np

_lgamma = np.frompyfunc(math.lgamma, 1, 1)


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, max_iter: int = 20000, eps: float = 1e-15) -> np.ndarray:
    """Continued fraction of the incomplete beta function (modified Lentz), element-wise."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    done = np.zeros(x.shape, dtype=bool)
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = np.where(done, h, h * d * c)
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = np.where(done, h, h * delta)
        done |= np.abs(delta - 1.0) < eps
        if done.all():
            break
    return h


def betainc(a, b, x) -> np.ndarray:
    """Regularised incomplete beta ``I_x(a, b)``, element-wise (float64; a, b > 0, 0 <= x <= 1)."""
    a, b, x = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, b, x)))
    out = np.where(x <= 0, 0.0, 1.0).astype(np.float64)
    inner = (x > 0) & (x < 1)
    if not inner.any():
        return out
    a_, b_, x_ = a[inner], b[inner], x[inner]
    log_front = (_lgamma(a_ + b_) - _lgamma(a_) - _lgamma(b_)).astype(np.float64) + a_ * np.log(x_) + b_ * np.log1p(-x_)
    front = np.exp(log_front)
    direct = x_ < (a_ + 1.0) / (a_ + b_ + 2.0)
    res = np.empty_like(x_)
    if direct.any():
        res[direct] = front[direct] * _betacf(a_[direct], b_[direct], x_[direct]) / a_[direct]
    if (~direct).any():
        nd = ~direct
        res[nd] = 1.0 - front[nd] * _betacf(b_[nd], a_[nd], 1.0 - x_[nd]) / b_[nd]
    out[inner] = np.clip(res, 0.0, 1.0)
    return out


def binom_sf(k, n, p) -> np.ndarray:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, element-wise (exact; float64).

    Parameters
    ----------
    k, n : array_like of int
        Observed count and trials (broadcast together).
    p : array_like of float
        Success probability.
    """
    k, n, p = np.broadcast_arrays(np.asarray(k, np.float64), np.asarray(n, np.float64), np.asarray(p, np.float64))
    out = np.ones(k.shape, dtype=np.float64)
    live = (k > 0) & (k <= n)
    out[k > n] = 0.0
    if live.any():
        kk, nn, pp = k[live], n[live], p[live]
        res = np.where(pp <= 0, 0.0, np.where(pp >= 1, 1.0, 0.0))
        mid = (pp > 0) & (pp < 1)
        if mid.any():
            res[mid] = betainc(kk[mid], nn[mid] - kk[mid] + 1.0, pp[mid])
        out[live] = res
    return out


def chi2_sf(x, dof) -> np.ndarray:
    """``P(X >= x)`` for a chi-square with ``dof`` degrees of freedom (float64; torch's regularised gamma)."""
    import torch

    x, dof = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(dof, np.float64))
    a = torch.from_numpy(np.ascontiguousarray(np.maximum(dof, 1e-12) / 2.0))
    out = torch.special.gammaincc(a, torch.from_numpy(np.ascontiguousarray(np.maximum(x, 0) / 2.0))).numpy()
    out = np.where(dof <= 0, 1.0, out.reshape(x.shape))
    return float(out) if out.ndim == 0 else out


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (false discovery rate) for p-values of any shape (NaN ignored)."""
    p = np.asarray(p, dtype=np.float64)
    flat = p.reshape(-1)
    q = np.full_like(flat, np.nan)
    ok = ~np.isnan(flat)
    vals = flat[ok]
    m = len(vals)
    if m:
        order = np.argsort(vals)
        ranked = vals[order] * m / np.arange(1, m + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        out = np.empty(m)
        out[order] = np.minimum(ranked, 1.0)
        q[ok] = out
    return q.reshape(p.shape)


def _elementary_symmetric(w: np.ndarray, k: int) -> np.ndarray:
    """e_0..e_k of the last axis of ``w`` (float64 [..., n]) -> [..., k + 1] (dynamic programming)."""
    e = np.zeros(w.shape[:-1] + (k + 1,))
    e[..., 0] = 1.0
    for i in range(w.shape[-1]):
        wi = w[..., i:i + 1]
        e[..., 1:] = e[..., 1:] + wi * e[..., :-1]
    return e


def topk_pair_null(inclusion: np.ndarray, k: int, *, iterations: int = 500, tol: float = 1e-10) -> np.ndarray:
    """Exact pair-inclusion probabilities of k distinct experts chosen independently given their loads.

    The null is the maximum-entropy law over k-subsets with the observed inclusion probabilities
    (conditional Poisson sampling: ``P(S) ∝ prod_{a in S} w_a`` over subsets of size k, with the weights
    ``w`` fitted so that ``P(a in S) = inclusion[a]``). It respects that top-k picks are without
    replacement, which ``p_a * p_b`` ignores: for uniform routing of E experts it gives
    ``k (k - 1) / (E (E - 1))`` per pair, where ``(k / E)^2`` undercounts co-activation lift by
    ``(k - 1) E / (k (E - 1))`` (0.57 at 8 experts, top-2).

    Parameters
    ----------
    inclusion : np.ndarray
        float [E], each expert's share of tokens whose top-k holds it (sums to k).
    k : int
        Experts per token (1 <= k <= number of experts with inclusion > 0).
    iterations, tol : int, float
        Fixed-point iterations ``w <- w * target / pi(w)`` and the stopping tolerance on ``pi``.

    Returns
    -------
    np.ndarray
        float64 [E, E], symmetric: ``P(a and b both chosen)``; the diagonal holds ``inclusion``.

    Raises
    ------
    ValueError
        ``inclusion`` does not sum to k, or fewer than k experts are ever chosen.
    """
    pi = np.clip(np.asarray(inclusion, dtype=np.float64).reshape(-1), 0.0, 1.0)
    num = len(pi)
    if not 1 <= k <= num or abs(pi.sum() - k) > 1e-6 * max(k, 1):
        raise ValueError(f"inclusion probabilities must sum to k = {k} (got {pi.sum():.6f}) over {num} experts")
    out = np.zeros((num, num))
    live = np.flatnonzero(pi > 0)
    if len(live) < k:
        raise ValueError(f"only {len(live)} experts are ever chosen, fewer than k = {k}")
    sure = live[pi[live] >= 1.0 - 1e-12]          # always chosen: pair probability is the other's inclusion
    free = np.setdiff1d(live, sure)
    kf = k - len(sure)
    if kf > 0 and len(free) > kf:
        target = pi[free]
        w = target / (1.0 - target)
        for _ in range(iterations):
            w = w / w.mean()
            e = _elementary_symmetric(w, kf)
            # e_{kf-1} without expert a, for every a: the DP over the others (mask a's weight to 0)
            without = np.where(np.eye(len(w), dtype=bool), 0.0, w[None, :])
            e_minus = _elementary_symmetric(without, kf)
            got = w * e_minus[:, kf - 1] / e[kf]
            if np.max(np.abs(got - target)) < tol:
                break
            w = w * target / np.maximum(got, 1e-300)
        w = w / w.mean()
        e_k = _elementary_symmetric(w, kf)[kf]
        if kf >= 2:
            n_free = len(w)
            idx = np.arange(n_free)
            e_pair = np.empty((n_free, n_free))
            for lo in range(0, n_free, 16):        # rows in chunks: memory O(16 E^2), not O(E^3)
                rows = idx[lo:lo + 16]
                keep = np.ones((len(rows), n_free, n_free), dtype=bool)
                keep[np.arange(len(rows)), :, rows] = False      # drop a ...
                keep[:, idx, idx] = False                        # ... and b
                e_pair[rows] = _elementary_symmetric(np.where(keep, w[None, None, :], 0.0), kf - 2)[..., kf - 2]
            pair = np.outer(w, w) * e_pair / e_k
        else:
            pair = np.zeros((len(w), len(w)))
        out[np.ix_(free, free)] = pair
    elif kf > 0:                                   # every free expert is always chosen too
        out[np.ix_(free, free)] = 1.0
    out[np.ix_(sure, live)] = pi[live][None, :]
    out[np.ix_(live, sure)] = pi[live][:, None]
    np.fill_diagonal(out, pi)
    return out
