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
