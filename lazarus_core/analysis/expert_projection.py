"""A 2-D map of expert outputs on the same tokens, coloured by expert, with its kNN separation against a null."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci
from lazarus_core.errors import BackendUnavailableError

METHODS = ("pca", "umap")
# Above this many entries the exact SVD gives way to torch.pca_lowrank.
_EXACT_SVD_ENTRIES = 1 << 24


# --------------------------------------------------------------------------------------- projections
def pca_2d(x, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components of the rows of ``x`` (torch SVD of the centred data).

    Parameters
    ----------
    x : torch.Tensor or np.ndarray
        float [N, D], N >= 2.
    seed : int
        Seed of the randomised :func:`torch.pca_lowrank` used for large inputs (exact SVD otherwise).

    Returns
    -------
    coords : np.ndarray
        float32 [N, 2] (a column of zeros when D = 1).
    explained_variance_ratio : np.ndarray
        float64 [2]: each component's share of the total variance.
    """
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    t = t.detach().to("cpu", torch.float64)
    if t.dim() != 2 or t.shape[0] < 2:
        raise ValueError(f"pca_2d expects [N >= 2, D], got shape {tuple(t.shape)}")
    centred = t - t.mean(dim=0, keepdim=True)
    total = float((centred * centred).sum())
    q = min(2, t.shape[1])
    if centred.numel() <= _EXACT_SVD_ENTRIES:
        u, sv, _ = torch.linalg.svd(centred, full_matrices=False)
    else:
        torch.manual_seed(seed)
        u, sv, _ = torch.pca_lowrank(centred, q=min(q + 8, *centred.shape), center=False, niter=6)
    u, sv = u[:, :q], sv[:q]
    coords = torch.zeros(t.shape[0], 2, dtype=torch.float64)
    coords[:, :q] = u * sv
    ratio = np.zeros(2)
    ratio[:q] = (sv * sv).numpy() / total if total > 0 else 0.0
    return coords.float().numpy(), ratio


def umap_2d(x, seed: int = 0) -> np.ndarray:
    """UMAP (McInnes et al. 2018) of the rows of ``x`` into 2-D, with the optional ``umap-learn``.

    Parameters
    ----------
    x : np.ndarray
        float [N, D].
    seed : int

    Returns
    -------
    np.ndarray
        float32 [N, 2].

    Raises
    ------
    BackendUnavailableError
        ``umap-learn`` is not installed (the message says ``pip install umap-learn``).
    """
    umap = require_umap()
    reducer = umap.UMAP(n_components=2, random_state=seed)
    return np.asarray(reducer.fit_transform(np.asarray(x, dtype=np.float32)), dtype=np.float32)


def require_umap():
    """Import ``umap`` or raise a one-line BackendUnavailableError naming ``pip install umap-learn``."""
    try:
        import umap
    except ImportError:
        raise BackendUnavailableError("--method umap needs the optional package umap-learn: "
                                      "pip install umap-learn (or use --method pca)") from None
    return umap


# ------------------------------------------------------------------------------------------ baseline
def knn_predictions(coords, labels, k: int = 5, seed: int = 0, chunk: int = 2048) -> np.ndarray:
    """Leave-one-out k-nearest-neighbour label of every point (Euclidean, majority vote).

    Parameters
    ----------
    coords : np.ndarray
        float [N, 2] (any width).
    labels : np.ndarray
        int [N], values in ``[0, C)``.
    k : int
        Neighbours (the point itself excluded); ``1 <= k < N``.
    seed : int
        Seed of the random tie break between labels with equal votes.
    chunk : int
        Rows of the distance matrix formed at a time.

    Returns
    -------
    np.ndarray
        int64 [N], the predicted label.
    """
    pts = torch.as_tensor(np.asarray(coords, dtype=np.float64))
    lab = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    n = pts.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"kNN needs 1 <= k < number of points, got k={k} for {n} points")
    c = int(lab.max()) + 1
    gen = torch.Generator().manual_seed(int(seed))
    pred = torch.empty(n, dtype=torch.int64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        dist = torch.cdist(pts[start:stop], pts)
        dist[torch.arange(stop - start), torch.arange(start, stop)] = float("inf")
        nb = dist.topk(k, dim=1, largest=False).indices
        votes = torch.zeros(stop - start, c, dtype=torch.float64).scatter_add_(
            1, lab[nb], torch.ones(stop - start, k, dtype=torch.float64))
        votes += torch.rand(votes.shape, generator=gen, dtype=torch.float64) * 0.5   # ties broken at random
        pred[start:stop] = votes.argmax(dim=1)
    return pred.numpy()


def _permute_within_blocks(labels: np.ndarray, blocks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shuffle ``labels`` within each block (a token's E points keep one of each expert label)."""
    order = np.lexsort((rng.random(labels.size), blocks))       # rows grouped by block, random inside
    grouped = np.argsort(blocks, kind="stable")                 # same blocks, original order inside
    out = np.empty_like(labels)
    out[grouped] = labels[order]
    return out


@dataclass
class KnnSeparation:
    """How well the 2-D map separates experts: leave-one-out kNN accuracy of the expert label.

    Attributes
    ----------
    k : int
    num_points : int
    accuracy : Interval
        Share of points whose k nearest neighbours vote for their own expert, with a bootstrap
        interval over documents (or tokens: a token's E points are resampled together).
    majority_rate : float
        Accuracy of always guessing the most common expert (1/E for the balanced map).
    permuted_mean : float
        Mean accuracy with the expert labels shuffled within each token (same map, same token
        structure, no expert identity): the null.
    permuted_low, permuted_high : float
        2.5 % and 97.5 % quantiles of the null.
    p_value : float
        ``(1 + #null >= observed) / (1 + n_permutations)``, one-sided.
    n_permutations : int
    """

    k: int
    num_points: int
    accuracy: Interval
    majority_rate: float
    permuted_mean: float
    permuted_low: float
    permuted_high: float
    p_value: float
    n_permutations: int

    def to_dict(self) -> dict:
        return {"k": self.k, "num_points": self.num_points, "accuracy": self.accuracy.to_dict(),
                "majority_rate": round(self.majority_rate, 6), "permuted_mean": round(self.permuted_mean, 6),
                "permuted_low": round(self.permuted_low, 6), "permuted_high": round(self.permuted_high, 6),
                "p_value": round(self.p_value, 6), "n_permutations": self.n_permutations}


def knn_separation(coords, labels, blocks=None, groups=None, *, k: int = 5, n_permutations: int = 20,
                   seed: int = 0, level: float = 0.95) -> KnnSeparation:
    """Leave-one-out kNN label accuracy of a map against the majority rate and a permutation null.

    Parameters
    ----------
    coords : np.ndarray
        float [N, 2].
    labels : np.ndarray
        int [N], the expert of each point.
    blocks : np.ndarray, optional
        int [N], the token of each point; labels are permuted within blocks (None: globally).
    groups : np.ndarray, optional
        int [N], the document of each point, the bootstrap unit (None: ``blocks``, else points).
    k, n_permutations, seed, level
        Neighbours, null draws, seed, interval coverage.

    Returns
    -------
    KnnSeparation
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = labels.size
    blocks = np.zeros(n, dtype=np.int64) if blocks is None else np.asarray(blocks).reshape(-1)
    unit = groups if groups is not None else (blocks if len(np.unique(blocks)) > 1 else None)
    correct = (knn_predictions(coords, labels, k, seed) == labels).astype(np.float64)
    accuracy = bootstrap_mean_ci(correct, unit, level=level, seed=seed)
    rng = np.random.default_rng(seed)
    null = []
    for i in range(n_permutations):
        perm = _permute_within_blocks(labels, blocks, rng)
        null.append(np.mean(knn_predictions(coords, perm, k, seed + 1 + i) == perm))
    null = np.asarray(null, dtype=np.float64)
    majority = float(np.bincount(labels).max() / n)
    alpha = (1.0 - level) / 2.0
    lo, hi = (np.quantile(null, [alpha, 1 - alpha]) if null.size else (float("nan"), float("nan")))
    p = float((1 + np.sum(null >= accuracy.estimate)) / (1 + null.size))
    return KnnSeparation(k, n, accuracy, majority, float(null.mean()) if null.size else float("nan"),
                         float(lo), float(hi), p, int(null.size))


# ------------------------------------------------------------------------------------------ analysis
@dataclass
class ExpertProjection:
    """A 2-D map of every expert's output on the same tokens.

    Attributes
    ----------
    layer : int or None
    method : str
        ``"pca"`` or ``"umap"``.
    num_tokens, num_experts : int
    coords : np.ndarray
        float32 [N, 2], one point per (token, expert) of the mapped tokens.
    expert : np.ndarray
        int64 [N], the expert of each point.
    token : np.ndarray
        int64 [N], the row (token) of each point in the given outputs (or the trace's global index).
    explained_variance_ratio : np.ndarray or None
        float64 [2] for PCA: each axis's share of the outputs' total variance; None for UMAP.
    separation : KnnSeparation
        kNN expert-label accuracy in the map, with its baselines.
    """

    layer: int | None
    method: str
    num_tokens: int
    num_experts: int
    coords: np.ndarray
    expert: np.ndarray
    token: np.ndarray
    explained_variance_ratio: np.ndarray | None
    separation: KnnSeparation

    def to_dict(self, points: bool = False) -> dict:
        """JSON-ready summary; ``points=True`` adds the coordinates (``x``, ``y``, ``expert``, ``token``)."""
        d = {"layer": self.layer, "method": self.method, "num_tokens": self.num_tokens,
             "num_experts": self.num_experts, "num_points": int(self.coords.shape[0]),
             "explained_variance_ratio": (None if self.explained_variance_ratio is None
                                          else np.round(self.explained_variance_ratio, 6).tolist()),
             "separation": self.separation.to_dict()}
        if points:
            d["points"] = {"x": np.round(self.coords[:, 0], 5).tolist(), "y": np.round(self.coords[:, 1], 5).tolist(),
                           "expert": self.expert.tolist(), "token": self.token.tolist()}
        return d


def expert_projection(outputs, method: str = "pca", *, k: int = 5, n_permutations: int = 20,
                      max_points: int = 4000, seed: int = 0, groups: np.ndarray | None = None,
                      token_index: np.ndarray | None = None, level: float = 0.95,
                      layer: int | None = None) -> ExpertProjection:
    """Project every expert's output on the same tokens to 2-D and measure how well experts separate.

    The map is fitted on all s x E points (PCA) or on the kept points (UMAP); the kNN baseline and the
    returned points use a seeded subset of at most ``max_points // E`` tokens (all E points of each).

    Parameters
    ----------
    outputs : torch.Tensor or np.ndarray
        float [s, E, H]: every expert's output on the same s tokens.
    method : str
        ``"pca"`` (torch, default) or ``"umap"`` (needs ``umap-learn``).
    k : int
        Neighbours of the kNN expert-label accuracy.
    n_permutations : int
        Draws of the within-token label permutation null.
    max_points : int
        Points kept for the kNN baseline, the returned map and UMAP.
    seed : int
    groups : np.ndarray, optional
        int [s], the document of each token (bootstrap unit of the accuracy interval).
    token_index : np.ndarray, optional
        int [s], the trace's global index of each token (recorded in ``token``).
    level : float
    layer : int, optional

    Returns
    -------
    ExpertProjection

    Raises
    ------
    ValueError
        Bad shapes or method, or too few points for k.
    BackendUnavailableError
        ``method="umap"`` without ``umap-learn``.
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if method == "umap":
        require_umap()
    out = outputs if isinstance(outputs, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(outputs))
    out = out.detach().to("cpu", torch.float32)
    if out.dim() != 3 or out.shape[0] == 0:
        raise ValueError(f"expert outputs must be non-empty [s, E, H], got shape {tuple(out.shape)}")
    s, e, h = out.shape
    keep = np.arange(s)
    if s * e > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(s, size=max(1, max_points // e), replace=False))
    flat_expert = np.tile(np.arange(e, dtype=np.int64), len(keep))
    flat_block = np.repeat(keep.astype(np.int64), e)
    if method == "pca":
        coords_all, ratio = pca_2d(out.reshape(s * e, h), seed)
        coords = coords_all.reshape(s, e, 2)[keep].reshape(-1, 2)
    else:
        coords, ratio = umap_2d(out[torch.as_tensor(keep)].reshape(-1, h).numpy(), seed), None
    doc = None if groups is None else np.repeat(np.asarray(groups).reshape(-1)[keep], e)
    separation = knn_separation(coords, flat_expert, flat_block, doc, k=k, n_permutations=n_permutations,
                                seed=seed, level=level)
    token = flat_block if token_index is None else np.repeat(np.asarray(token_index, dtype=np.int64)[keep], e)
    return ExpertProjection(layer, method, s, e, coords.astype(np.float32), flat_expert, token, ratio, separation)


def trace_expert_projection(trace, layers: list[int] | None = None, *, method: str = "pca",
                            max_tokens: int | None = None, **kwargs) -> list[ExpertProjection]:
    """:func:`expert_projection` per MoE layer of a trace captured with ``--all-experts``.

    Parameters
    ----------
    trace : lazarus_core.routing.trace_reader.Trace
    layers : list of int, optional
        Model layer indices (default: every captured layer).
    method : str
    max_tokens : int, optional
        Use a seeded uniform subset of at most this many sampled tokens.
    **kwargs
        Passed to :func:`expert_projection` (k, n_permutations, max_points, seed, level).

    Returns
    -------
    list of ExpertProjection

    Raises
    ------
    ValueError
        The trace has no all-expert outputs (the message names ``--all-experts``).
    """
    if not getattr(trace, "has_all_expert_outputs", False):
        raise ValueError(f"the trace {trace.path} was captured without --all-experts: recapture it with "
                         "`lazarus capture ... --all-experts`")
    seed = kwargs.get("seed", 0)
    doc_ids = np.asarray(trace.doc_ids)
    results = []
    for layer in (trace.layers if layers is None else layers):
        acts = trace.activations(layer)
        if acts.all_expert_outputs is None:
            raise ValueError(f"layer {layer} of the trace {trace.path} has no all-expert outputs (--all-experts)")
        index = np.asarray(acts.sample_index)
        rows = np.arange(len(index))
        if max_tokens is not None and len(index) > max_tokens:
            rows = np.sort(np.random.default_rng(seed).choice(len(index), size=max_tokens, replace=False))
        results.append(expert_projection(np.asarray(acts.all_expert_outputs)[rows], method, groups=doc_ids[index[rows]],
                                         token_index=index[rows], layer=layer, **kwargs))
    return results
