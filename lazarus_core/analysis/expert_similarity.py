"""How alike a layer's experts are on the same tokens (linear CKA, cosine), against random experts, noise ceiling."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable

import numpy as np
import torch

from lazarus_core.analysis.intervals import Interval

METHODS = ("cka", "cosine")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# Fewer documents than this and the half splits (intervals, reliability) split tokens instead.
MIN_DOCUMENTS = 10
# Above this many float64 entries, G = <K_i, K_j> is formed pair by pair instead of in one matmul.
_MAX_DENSE_ENTRIES = 1 << 25


# ------------------------------------------------------------------------------------------ arrays
def _as_float64(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.detach().to(device="cpu", dtype=torch.float64)


def _kernel_inner(xs: torch.Tensor) -> torch.Tensor:
    """``G[i, j] = <X_i X_i^T, X_j X_j^T>_F = ||X_i^T X_j||_F^2`` for xs float64 [E, n, d] -> [E, E].

    Uses the feature-space form (one [E*d, E*d] product) or the Gram-space form (one [E, n*n] product),
    whichever costs less, and a pair-by-pair loop when neither fits in memory.
    """
    e, n, d = xs.shape
    feature_cost, gram_cost = n * (e * d) ** 2, e * n * n * d + e * e * n * n
    if (e * d) ** 2 <= _MAX_DENSE_ENTRIES and (feature_cost <= gram_cost or e * n * n > _MAX_DENSE_ENTRIES):
        z = xs.permute(1, 0, 2).reshape(n, e * d)
        m = (z.T @ z).reshape(e, d, e, d)
        return (m * m).sum(dim=(1, 3))
    if e * n * n <= _MAX_DENSE_ENTRIES:
        k = (xs @ xs.transpose(1, 2)).reshape(e, n * n)
        return k @ k.T
    g = torch.empty(e, e, dtype=torch.float64)
    for i in range(e):
        k_i = None if d <= n else xs[i] @ xs[i].T
        for j in range(i, e):
            if k_i is None:
                c = xs[i].T @ xs[j]
                g[i, j] = (c * c).sum()
            else:
                g[i, j] = (k_i * (xs[j] @ xs[j].T)).sum()
            g[j, i] = g[i, j]
    return g


def hsic_matrix(xs, unbiased: bool = True) -> torch.Tensor:
    """Linear-kernel HSIC between every pair of representations of the same n rows.

    Parameters
    ----------
    xs : torch.Tensor or np.ndarray
        float [E, n, d]: E representations (experts) of the same n rows (tokens).
    unbiased : bool
        True: the unbiased U-statistic of Song et al. (2012), eq. 5 (n >= 4), as used for CKA by
        Nguyen, Raghu & Kornblith (2021). False: the biased ``tr(K H L H) / (n - 1)^2`` of Gretton et al. (2005).

    Returns
    -------
    torch.Tensor
        float64 [E, E], symmetric.
    """
    xs = _as_float64(xs)
    if xs.dim() != 3:
        raise ValueError(f"hsic_matrix expects [E, n, d], got shape {tuple(xs.shape)}")
    e, n, _ = xs.shape
    if not unbiased:
        if n < 2:
            raise ValueError(f"the biased HSIC needs at least 2 rows, got {n}")
        xc = xs - xs.mean(dim=1, keepdim=True)
        return _kernel_inner(xc) / float((n - 1) ** 2)
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 rows, got {n}")
    # K~ = X X^T with its diagonal zeroed; every term of eq. 5 reduces to row norms, column sums and G.
    r = (xs * xs).sum(dim=2)                                    # [E, n] = diag(K)
    trace_kl = _kernel_inner(xs) - r @ r.T                      # tr(K~ L~)
    col = xs.sum(dim=1)                                         # [E, d]
    ones_k_ones = (col * col).sum(dim=1) - r.sum(dim=1)         # 1^T K~ 1
    k_ones = torch.einsum("enh,eh->en", xs, col) - r            # K~ 1, [E, n]
    one_kl_one = k_ones @ k_ones.T                              # 1^T K~ L~ 1
    hsic = (trace_kl + torch.outer(ones_k_ones, ones_k_ones) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one_kl_one) / (n * (n - 3))
    return (hsic + hsic.T) / 2.0


def hsic_from_grams(grams: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Linear-kernel HSIC between every pair of precomputed Gram matrices (the same estimators as :func:`hsic_matrix`).

    Parameters
    ----------
    grams : torch.Tensor
        float64 [E, n, n], ``K_e = X_e X_e^T``.
    unbiased : bool

    Returns
    -------
    torch.Tensor
        float64 [E, E].
    """
    e, n, _ = grams.shape
    if not unbiased:
        if n < 2:
            raise ValueError(f"the biased HSIC needs at least 2 rows, got {n}")
        kc = (grams - grams.mean(dim=1, keepdim=True) - grams.mean(dim=2, keepdim=True)
              + grams.mean(dim=(1, 2), keepdim=True))                # H K H
        flat = kc.reshape(e, n * n)
        return flat @ flat.T / float((n - 1) ** 2)
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 rows, got {n}")
    # K~ = K with its diagonal zeroed, without copying K: subtract the diagonal's share from each term.
    diag = torch.diagonal(grams, dim1=1, dim2=2)                # [E, n]
    flat = grams.reshape(e, n * n)
    k_ones = grams.sum(dim=2) - diag                           # K~ 1, [E, n]
    ones_k_ones = k_ones.sum(dim=1)                            # 1^T K~ 1
    trace_kl = flat @ flat.T - diag @ diag.T                   # tr(K~ L~)
    hsic = (trace_kl + torch.outer(ones_k_ones, ones_k_ones) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (k_ones @ k_ones.T)) / (n * (n - 3))
    return (hsic + hsic.T) / 2.0


def _cka_from_hsic(h: torch.Tensor) -> np.ndarray:
    diag = torch.diagonal(h).clamp(min=0.0)
    denom = torch.sqrt(torch.outer(diag, diag))
    return torch.where(denom > 0, h / denom, torch.full_like(h, float("nan"))).numpy()


def linear_cka_matrix(outputs, unbiased: bool = True) -> np.ndarray:
    """Linear CKA between every pair of experts on the same tokens.

    ``CKA(i, j) = HSIC(K_i, K_j) / sqrt(HSIC(K_i, K_i) HSIC(K_j, K_j))`` with linear kernels
    ``K_e = X_e X_e^T`` (Kornblith et al. 2019). Invariant to orthogonal transforms and isotropic scaling
    of either representation; 1 on the diagonal. With ``unbiased=True`` two independent representations
    score about 0 at any n (the estimate may be slightly negative); the biased estimator is inflated
    at small n (for independent Gaussians its expectation is about ``d / (n + d)`` when both have d dims).

    Parameters
    ----------
    outputs : torch.Tensor or np.ndarray
        float [s, E, H]: every expert's output on the same s tokens.
    unbiased : bool
        Unbiased HSIC (default) or the biased one (for comparison).

    Returns
    -------
    np.ndarray
        float64 [E, E]. An expert whose output does not vary over the tokens has NaN in its row and column.
    """
    xs = _as_float64(outputs)
    if xs.dim() != 3:
        raise ValueError(f"expert outputs must be [s, E, H], got shape {tuple(xs.shape)}")
    return _cka_from_hsic(hsic_matrix(xs.transpose(0, 1), unbiased=unbiased))


def linear_cka(x, y, unbiased: bool = True) -> float:
    """Linear CKA between two representations of the same n rows.

    Parameters
    ----------
    x : torch.Tensor or np.ndarray
        float [n, d1].
    y : torch.Tensor or np.ndarray
        float [n, d2] (same rows, any width).
    unbiased : bool
        Unbiased HSIC of Song et al. 2012 (default; about 0 for independent data) or the biased one.

    Returns
    -------
    float
        In [-small, 1]; NaN when either representation is constant over the rows.
    """
    x, y = _as_float64(x), _as_float64(y)
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka expects [n, d1] and [n, d2] with the same n, "
                         f"got {tuple(x.shape)}, {tuple(y.shape)}")
    width = max(x.shape[1], y.shape[1])
    pad = torch.zeros(2, x.shape[0], width, dtype=torch.float64)    # zero columns change no kernel
    pad[0, :, : x.shape[1]] = x
    pad[1, :, : y.shape[1]] = y
    return float(linear_cka_matrix(pad.transpose(0, 1), unbiased=unbiased)[0, 1])


def cosine_similarity_matrix(outputs) -> np.ndarray:
    """Mean over tokens of the cosine between two experts' outputs on the same token.

    Parameters
    ----------
    outputs : torch.Tensor or np.ndarray
        float [s, E, H].

    Returns
    -------
    np.ndarray
        float64 [E, E] in [-1, 1]: 1 for experts with identical outputs, -1 for opposite ones; a zero
        output vector counts as cosine 0.
    """
    xs = _as_float64(outputs)
    if xs.dim() != 3 or xs.shape[0] == 0:
        raise ValueError(f"expert outputs must be non-empty [s, E, H], got shape {tuple(xs.shape)}")
    norms = xs.norm(dim=2, keepdim=True)
    unit = torch.where(norms > 0, xs / norms.clamp(min=1e-300), torch.zeros_like(xs))
    return (torch.einsum("seh,sfh->ef", unit, unit) / xs.shape[0]).numpy()


def similarity_matrix(outputs, method: str = "cka", *, unbiased: bool = True) -> np.ndarray:
    """The E x E similarity of ``method`` (``"cka"`` or ``"cosine"``) for outputs float [s, E, H]."""
    if method == "cka":
        return linear_cka_matrix(outputs, unbiased=unbiased)
    if method == "cosine":
        return cosine_similarity_matrix(outputs)
    raise ValueError(f"--method {method!r}: use one of {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------ random floor
def randomized_experts(experts: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of an experts module with every parameter redrawn from N(0, std of that parameter tensor).

    Same shapes, same forward, same scale per tensor (biases too), no learned structure: the experts are
    independently initialised. A tensor with one element keeps its magnitude as the std.

    Parameters
    ----------
    experts : torch.nn.Module
        A transformers experts module (fused ``gate_up_proj`` / ``down_proj`` and optional biases).
    seed : int

    Returns
    -------
    torch.nn.Module
        The re-initialised deep copy (the original is untouched).

    Raises
    ------
    ValueError
        A parameter is not floating point (a quantised module): it cannot be redrawn.
    """
    clone = copy.deepcopy(experts)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if not p.is_floating_point():
                raise ValueError(f"cannot re-initialise the quantised expert parameter {name} ({p.dtype}) for the "
                                 "random-expert floor; load the model dequantised or pass --no-floor")
            std = p.detach().float().std() if p.numel() > 1 else p.detach().float().abs().reshape(())
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            p.copy_(noise.to(device=p.device, dtype=p.dtype))
    return clone


def random_expert_outputs(experts: torch.nn.Module, hidden, seed: int = 0,
                          run: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Outputs of independently initialised random experts of the same shape on the same hidden states.

    Parameters
    ----------
    experts : torch.nn.Module
        The layer's experts module (``find_moe_layers(model).layers[L].experts``).
    hidden : torch.Tensor or np.ndarray
        float [s, H]: the router inputs of the tokens the real experts were run on.
    seed : int
    run : callable, optional
        ``run(experts, hidden [s, H]) -> [s, E, H]``; default
        :func:`lazarus_core.routing.expert_outputs.each_expert_output`.

    Returns
    -------
    np.ndarray
        float32 [s, E, H].
    """
    if run is None:
        from lazarus_core.routing.expert_outputs import each_expert_output as run
    random = randomized_experts(experts, seed)
    param = next(random.parameters())
    h = hidden if isinstance(hidden, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(hidden))
    with torch.inference_mode():
        out = run(random, h.to(device=param.device, dtype=param.dtype))
    return out.detach().float().cpu().numpy()


# ------------------------------------------------------------------------------------------ results
def _off_diagonal(matrix: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(matrix.shape[0], k=1)
    return matrix[iu]


@dataclass
class OffDiagonalSummary:
    """The distribution of the E(E-1)/2 between-expert similarities of one matrix.

    Attributes
    ----------
    mean : Interval
        Mean over expert pairs, with a half-sample interval over documents (or tokens).
    quantiles : dict[str, float]
        ``"q05"`` ... ``"q95"`` over the pairs.
    min, max : float
    most_similar : (int, int)
        The pair with the largest similarity.
    """

    mean: Interval
    quantiles: dict
    min: float
    max: float
    most_similar: tuple

    def to_dict(self) -> dict:
        return {"mean": self.mean.to_dict(), "quantiles": {k: round(v, 6) for k, v in self.quantiles.items()},
                "min": round(self.min, 6), "max": round(self.max, 6), "most_similar": list(self.most_similar)}


@dataclass
class RandomFloor:
    """Independently initialised random experts of the same shape, run on the same hidden states.

    What sharing the inputs alone gives. A reference rather than a guaranteed lower bound: under CKA,
    random experts are close to random maps of the input and inherit its dominant directions, so trained
    experts can score below them (a negative ``excess``).

    Attributes
    ----------
    matrix : np.ndarray
        float64 [E, E], the same similarity between the random experts.
    off_diagonal : OffDiagonalSummary
    excess : Interval
        Mean between-expert similarity of the real experts minus that of the random ones (same halves,
        so the interval is paired); above 0: more alike than shared inputs alone make them.
    """

    matrix: np.ndarray
    off_diagonal: OffDiagonalSummary
    excess: Interval

    def to_dict(self) -> dict:
        return {"matrix": np.round(self.matrix, 6).tolist(), "off_diagonal": self.off_diagonal.to_dict(),
                "excess": self.excess.to_dict()}


@dataclass
class NoiseCeiling:
    """How far the measured pattern can be trusted: split-half reliability of the E x E matrix.

    The literal "same expert on two disjoint halves of the tokens" is not defined for CKA or per-token
    cosine (both compare two representations row by row on the same tokens), and an expert compared
    with itself on the same tokens scores exactly 1 (``max_similarity``) at any n. What bounds how much
    of the measured pattern is signal is its reproducibility on fresh tokens: the noise ceiling of
    representational similarity analysis (Nili et al. 2014). The tokens (whole documents when known)
    are split into two random disjoint halves, the matrix is computed on each, and the off-diagonal
    entries of the two are correlated; Spearman-Brown ``2r / (1 + r)`` turns the half-length
    correlation into the reliability of the full-sample matrix.

    Attributes
    ----------
    max_similarity : float
        1.0: an expert against itself, the largest value either measure takes.
    split_half_r : Interval or None
        Pearson r between the two halves' off-diagonal entries: the median over ``n_splits`` random
        splits, with the 2.5-97.5 % range over splits. None with fewer than 3 expert pairs.
    reliability : float or None
        Spearman-Brown corrected median r (1: the pattern is fully reproducible; 0: noise).
    split_half_mean_abs_diff : float
        Mean |S_A - S_B| over pairs and splits, in similarity units: how much one value moves on fresh tokens.
    n_splits : int
    """

    max_similarity: float
    split_half_r: Interval | None
    reliability: float | None
    split_half_mean_abs_diff: float
    n_splits: int

    def to_dict(self) -> dict:
        return {"max_similarity": self.max_similarity,
                "split_half_r": None if self.split_half_r is None else self.split_half_r.to_dict(),
                "reliability": None if self.reliability is None else round(self.reliability, 6),
                "split_half_mean_abs_diff": round(self.split_half_mean_abs_diff, 6), "n_splits": self.n_splits}


@dataclass
class ExpertSimilarity:
    """E x E similarity of a layer's experts on the same tokens, with a random floor and a noise ceiling.

    Attributes
    ----------
    layer : int or None
        Model layer index (None for bare arrays).
    method : str
        ``"cka"`` (linear CKA) or ``"cosine"`` (mean per-token cosine).
    estimator : str or None
        ``"unbiased"`` or ``"biased"`` HSIC for CKA; None for cosine.
    num_tokens, num_experts : int
    matrix : np.ndarray
        float64 [E, E].
    off_diagonal : OffDiagonalSummary
    floor : RandomFloor or None
        None when no random-expert outputs were given.
    ceiling : NoiseCeiling
    """

    layer: int | None
    method: str
    estimator: str | None
    num_tokens: int
    num_experts: int
    matrix: np.ndarray
    off_diagonal: OffDiagonalSummary
    floor: RandomFloor | None
    ceiling: NoiseCeiling

    def to_dict(self) -> dict:
        return {"layer": self.layer, "method": self.method, "estimator": self.estimator,
                "num_tokens": self.num_tokens, "num_experts": self.num_experts,
                "matrix": np.round(self.matrix, 6).tolist(), "off_diagonal": self.off_diagonal.to_dict(),
                "floor": None if self.floor is None else self.floor.to_dict(), "ceiling": self.ceiling.to_dict()}


# ----------------------------------------------------------------------------------------- analysis
def _half_splits(units: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` random partitions of the rows into two halves of whole units (documents or tokens)."""
    uniq, inverse = np.unique(units, return_inverse=True)
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(n_splits):
        in_a = np.zeros(len(uniq), dtype=bool)
        in_a[rng.permutation(len(uniq))[: len(uniq) // 2]] = True
        a = in_a[inverse]
        splits.append((np.flatnonzero(a), np.flatnonzero(~a)))
    return splits


def _summary(matrix: np.ndarray, half_means: np.ndarray, level: float, method: str, n_units: int) -> OffDiagonalSummary:
    off = _off_diagonal(matrix)
    est = float(np.nanmean(off)) if off.size else float("nan")
    mean = _half_sample_interval(est, half_means, level, method, n_units)
    if off.size and np.isfinite(off).any():
        q = np.nanquantile(off, QUANTILES)
        iu = np.triu_indices(matrix.shape[0], k=1)
        best = int(np.nanargmax(off))
        pair, lo, hi = (int(iu[0][best]), int(iu[1][best])), float(np.nanmin(off)), float(np.nanmax(off))
    else:
        q, pair, lo, hi = [float("nan")] * len(QUANTILES), (0, 0), float("nan"), float("nan")
    return OffDiagonalSummary(mean, {f"q{round(p * 100):02d}": float(v) for p, v in zip(QUANTILES, q)}, lo, hi, pair)


def _half_sample_interval(estimate: float, half_values: np.ndarray, level: float, method: str,
                          n_units: int) -> Interval:
    """Normal interval from balanced half-samples (McCarthy 1969): ``se^2 = mean(((a - b) / 2)^2)``.

    ``half_values`` holds the statistic on the two complementary halves of each split, in pairs
    ``[a_1, b_1, a_2, b_2, ...]``. For a mean, ``(a - b) / 2`` is exactly the deviation of a half from the
    full sample, whose variance matches the full sample's sampling variance (a half drawn without
    replacement has the finite-population factor 1/2). Taking the difference of two halves of equal
    size also cancels any bias that depends on the sample size (the biased HSIC's offset).
    """
    pairs = np.asarray(half_values, dtype=np.float64).reshape(-1, 2)
    diffs = (pairs[:, 0] - pairs[:, 1]) / 2.0
    diffs = diffs[np.isfinite(diffs)]
    if not np.isfinite(estimate) or diffs.size == 0:
        return Interval(estimate, float("nan"), float("nan"), level, method, n_units)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    se = float(np.sqrt(np.mean(diffs ** 2)))
    return Interval(estimate, estimate - z * se, estimate + z * se, level, method, n_units)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def expert_similarity(outputs, method: str = "cka", seed: int = 0, random_outputs=None, *,
                      unbiased: bool = True, groups: np.ndarray | None = None, n_splits: int = 20,
                      level: float = 0.95, layer: int | None = None) -> ExpertSimilarity:
    """E x E similarity of expert outputs on the same tokens, with its floor, noise ceiling and intervals.

    Parameters
    ----------
    outputs : torch.Tensor or np.ndarray
        float [s, E, H]: every expert's output (before routing weight) on the same s tokens.
    method : str
        ``"cka"``: linear CKA (unbiased HSIC by default); ``"cosine"``: mean per-token cosine.
    seed : int
        Seed of the random half splits.
    random_outputs : torch.Tensor or np.ndarray, optional
        float [s, E', H]: outputs of independently initialised random experts on the same hidden
        states (:func:`random_expert_outputs`), the floor. None: no floor.
    unbiased : bool
        For ``"cka"``: the unbiased (default) or biased HSIC estimator.
    groups : np.ndarray, optional
        int [s]: document of each token; the half splits and the intervals keep documents whole
        (tokens of a document are not independent) when there are at least ``MIN_DOCUMENTS`` (10).
        None or fewer documents: tokens are the units (``mean.method`` says which).
    n_splits : int
        Random half splits (interval of the means, split-half reliability).
    level : float
        Coverage of the intervals.
    layer : int, optional
        Recorded in the result.

    Returns
    -------
    ExpertSimilarity

    Raises
    ------
    ValueError
        Wrong shapes, an unknown method, or too few tokens (CKA needs 4 per half: at least 8).
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    out = _as_float64(outputs)
    if out.dim() != 3:
        raise ValueError(f"expert outputs must be [s, E, H], got shape {tuple(out.shape)}")
    s, e, _ = out.shape
    if e < 2:
        raise ValueError(f"expert similarity needs at least 2 experts, got {e}")
    rand = None
    if random_outputs is not None:
        rand = _as_float64(random_outputs)
        if rand.dim() != 3 or rand.shape[0] != s:
            raise ValueError(f"random_outputs must be [s={s}, E, H], got shape {tuple(rand.shape)}")
    if groups is not None and np.asarray(groups).reshape(-1).shape[0] != s:
        raise ValueError(f"groups has {np.asarray(groups).size} entries for {s} tokens")
    if groups is not None and len(np.unique(groups)) >= MIN_DOCUMENTS:
        units, interval_method = np.asarray(groups).reshape(-1), "half-sample-documents"
    else:                                 # too few documents to halve usefully: split tokens
        units, interval_method = np.arange(s), "half-sample-tokens"
    n_units = len(np.unique(units))
    min_rows = 8 if method == "cka" else 2
    if s < min_rows:
        raise ValueError(f"expert similarity needs at least {min_rows} tokens, got {s}")

    # For CKA, each expert's Gram matrix is formed once and every half reads its sub-block (float64 when it
    # fits the dense budget, float32 up to 4x that; beyond, each half is computed from the outputs).
    widths = e + (0 if rand is None else rand.shape[1])
    cache_dtype = (torch.float64 if widths * s * s <= _MAX_DENSE_ENTRIES
                   else torch.float32 if widths * s * s <= 4 * _MAX_DENSE_ENTRIES else None)
    use_grams = method == "cka" and cache_dtype is not None
    grams = {}
    if use_grams:
        for which, x in (("out", out), ("rand", rand)):
            if x is not None:
                xt = x.transpose(0, 1).to(cache_dtype)                  # [E, s, H]
                grams[which] = xt @ xt.transpose(1, 2)

    def sim(which: str, rows: np.ndarray | None = None) -> np.ndarray:
        if use_grams:
            g = grams[which]
            if rows is not None:
                idx = torch.as_tensor(rows)
                g = g.index_select(1, idx).index_select(2, idx)
            return _cka_from_hsic(hsic_from_grams(g.to(torch.float64), unbiased=unbiased))
        x = out if which == "out" else rand
        return similarity_matrix(x if rows is None else x[torch.as_tensor(rows)], method, unbiased=unbiased)

    matrix = sim("out")
    floor_matrix = sim("rand") if rand is not None else None
    half_means, floor_half_means, excess_half, rs, abs_diffs = [], [], [], [], []
    for a, b in _half_splits(units, n_splits, seed):
        if min(a.size, b.size) < min_rows // 2:
            continue
        sa, sb = sim("out", a), sim("out", b)
        oa, ob = _off_diagonal(sa), _off_diagonal(sb)
        half_means += [np.nanmean(oa), np.nanmean(ob)]
        rs.append(_pearson(oa, ob))
        abs_diffs.append(float(np.nanmean(np.abs(oa - ob))))
        if rand is not None:
            fa, fb = _off_diagonal(sim("rand", a)), _off_diagonal(sim("rand", b))
            floor_half_means += [np.nanmean(fa), np.nanmean(fb)]
            excess_half += [np.nanmean(oa) - np.nanmean(fa), np.nanmean(ob) - np.nanmean(fb)]
    summary = _summary(matrix, np.asarray(half_means, dtype=np.float64), level, interval_method, n_units)
    floor = None
    if floor_matrix is not None:
        floor_summary = _summary(floor_matrix, np.asarray(floor_half_means, dtype=np.float64), level,
                                 interval_method, n_units)
        excess = _half_sample_interval(summary.mean.estimate - floor_summary.mean.estimate,
                                       np.asarray(excess_half, dtype=np.float64), level, interval_method, n_units)
        floor = RandomFloor(floor_matrix, floor_summary, excess)
    rs_arr = np.asarray([r for r in rs if np.isfinite(r)], dtype=np.float64)
    if rs_arr.size:
        r_med = float(np.median(rs_arr))
        alpha = (1.0 - level) / 2.0
        r_int = Interval(r_med, float(np.quantile(rs_arr, alpha)), float(np.quantile(rs_arr, 1 - alpha)), level,
                         "spread-over-random-splits", int(rs_arr.size))
        reliability = 2 * r_med / (1 + r_med) if r_med > -1 else float("nan")
    else:
        r_int, reliability = None, None
    ceiling = NoiseCeiling(1.0, r_int, reliability, float(np.mean(abs_diffs)) if abs_diffs else float("nan"),
                           len(rs))
    return ExpertSimilarity(layer, method, ("unbiased" if unbiased else "biased") if method == "cka" else None,
                            s, e, matrix, summary, floor, ceiling)


def trace_expert_similarity(trace, layers: list[int] | None = None, *, method: str = "cka", model=None,
                            max_tokens: int | None = None, seed: int = 0, unbiased: bool = True,
                            n_splits: int = 20, level: float = 0.95) -> list[ExpertSimilarity]:
    """:func:`expert_similarity` per MoE layer of a trace captured with ``--all-experts``.

    Parameters
    ----------
    trace : lazarus_core.routing.trace_reader.Trace
        Needs ``all_expert_outputs`` (and ``hidden`` for the floor).
    layers : list of int, optional
        Model layer indices (default: every captured layer).
    method : str
        ``"cka"`` or ``"cosine"``.
    model : transformers model, optional
        The traced model; its experts modules give the random-expert floor. None: no floor.
    max_tokens : int, optional
        Use a seeded uniform subset of at most this many sampled tokens.
    seed, unbiased, n_splits, level
        As in :func:`expert_similarity`; the floor of layer L uses seed ``seed + L``.

    Returns
    -------
    list of ExpertSimilarity, one per layer in order.

    Raises
    ------
    ValueError
        The trace lacks expert outputs of every expert (the message names ``--all-experts``), or a layer
        is not in the trace.
    """
    if not getattr(trace, "has_all_expert_outputs", False):
        raise ValueError(f"the trace {trace.path} was captured without --all-experts: recapture it with "
                         "`lazarus capture ... --all-experts --hidden-states`")
    info = None
    if model is not None:
        from lazarus_core.routing.locate import find_moe_layers

        info = find_moe_layers(model)
    doc_ids = trace.doc_ids
    results = []
    for layer in (trace.layers if layers is None else layers):
        acts = trace.activations(layer)
        outputs, hidden, index = acts.all_expert_outputs, acts.hidden, np.asarray(acts.sample_index)
        if outputs is None:
            raise ValueError(f"layer {layer} of the trace {trace.path} has no all-expert outputs (--all-experts)")
        rows = _subsample(len(index), max_tokens, seed)
        outputs, index = np.asarray(outputs)[rows], index[rows]
        random_outputs = None
        if info is not None and hidden is not None:
            random_outputs = random_expert_outputs(info.layers[layer].experts, np.asarray(hidden)[rows], seed + layer)
        results.append(expert_similarity(outputs, method, seed, random_outputs, unbiased=unbiased,
                                         groups=np.asarray(doc_ids)[index], n_splits=n_splits, level=level,
                                         layer=layer))
    return results


def _subsample(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    """Sorted seeded uniform subset of ``range(n)`` of at most ``max_rows`` (all when None or n is smaller)."""
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
