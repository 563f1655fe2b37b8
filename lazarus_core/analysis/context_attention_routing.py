"""Does one token get similar experts in contexts where it attends alike? Similarity matrices and a Mantel test per layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import permutations as all_permutations
from typing import Sequence

import numpy as np

from lazarus_core.analysis.attention_routing import average_ranks, spearman
from lazarus_core.analysis.intervals import Interval
from lazarus_core.trigram.stats import benjamini_hochberg

ATTENTION_SIMILARITIES = ("output", "rows")
ROUTING_SIMILARITIES = ("jaccard", "probability")


# ------------------------------------------------------------------------------------- similarities
def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """float64 [n, n] cosine similarity of the rows of ``x`` float [n, d] (0 for a zero row)."""
    x = np.asarray(x, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def jaccard_matrix(sets: np.ndarray) -> np.ndarray:
    """float64 [n, n] Jaccard overlap of the expert sets ``sets`` int [n, k]."""
    sets = np.asarray(sets, np.int64)
    e = int(sets.max()) + 1 if sets.size else 1
    onehot = np.zeros((len(sets), e))
    np.put_along_axis(onehot, sets, 1.0, 1)
    inter = onehot @ onehot.T
    sizes = onehot.sum(1)
    return inter / np.maximum(sizes[:, None] + sizes[None, :] - inter, 1e-12)


def correlation_matrix(x: np.ndarray) -> np.ndarray:
    """float64 [n, n] Pearson correlation of the rows of ``x`` float [n, E] (e.g. router probabilities)."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(1, keepdims=True)
    return cosine_matrix(x)


def offset_profiles(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Attention rows of one position in several contexts, aligned by distance so they can be compared.

    Parameters
    ----------
    rows : sequence of np.ndarray
        Per context, float [p + 1]: the head-mean attention of the token at position p over positions 0..p.

    Returns
    -------
    np.ndarray
        float64 [n, max p + 1]: column d = the weight on the token d positions back (0 = itself), zero-padded.
    """
    width = max(len(r) for r in rows)
    out = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = np.asarray(r, np.float64)[::-1]
    return out


# ------------------------------------------------------------------------------------------- Mantel
@dataclass
class MantelTest:
    """Rank correlation of two similarity matrices over context pairs, with a permutation p-value.

    Attributes
    ----------
    statistic : float
        Spearman correlation over the upper triangle (pairs i < j).
    p_value : float
        One-sided (``greater``) or two-sided permutation p: contexts of one matrix permuted (rows and columns
        together), ``(1 + #{null >= observed}) / (1 + permutations)``; exact over all n! orders when n! is small.
    permutations : int
    exact : bool
    null_mean, null_low, null_high : float
        Mean and 2.5-97.5% range of the statistic under permutation (the baseline).
    interval : Interval
        Bootstrap over contexts (pairs of distinct resampled contexts).
    pairs : int
    alternative : str
    """

    statistic: float
    p_value: float
    permutations: int
    exact: bool
    null_mean: float
    null_low: float
    null_high: float
    interval: Interval
    pairs: int
    alternative: str

    def to_dict(self) -> dict:
        return {"statistic": self.statistic, "p_value": self.p_value, "permutations": self.permutations,
                "exact": self.exact, "null_mean": self.null_mean, "null_low": self.null_low,
                "null_high": self.null_high, "interval": self.interval.to_dict(), "pairs": self.pairs,
                "alternative": self.alternative}


def _nan_mantel(n: int, alternative: str) -> MantelTest:
    nan = float("nan")
    return MantelTest(nan, nan, 0, False, nan, nan, nan, Interval(nan, nan, nan, 0.95, "bootstrap-contexts", n),
                      n * (n - 1) // 2, alternative)


def _null_block(rb: np.ndarray, orders: np.ndarray, iu: tuple, za: np.ndarray) -> np.ndarray:
    """Spearman statistics of the rank matrix ``rb`` under each context order (rows of ``orders``)."""
    pb = rb[orders[:, iu[0]], orders[:, iu[1]]]                       # [P, pairs]
    return ((pb - pb.mean(1, keepdims=True)) / pb.std(1, keepdims=True)) @ za / len(za)


def mantel_test(a: np.ndarray, b: np.ndarray, *, permutations: int = 999, alternative: str = "greater",
                n_boot: int = 1000, seed: int = 0) -> MantelTest:
    """Mantel test: Spearman correlation of two symmetric similarity matrices, p by permuting contexts.

    Parameters
    ----------
    a, b : np.ndarray
        float [n, n] similarity matrices over the same n contexts (only i < j is read).
    permutations : int
        Random context permutations (all n! orders instead when n! <= permutations).
    alternative : {"greater", "two-sided"}
        ``greater``: similar attention goes with similar routing.
    n_boot : int
        Bootstrap replicates of the interval (0: no interval, NaN bounds).
    seed : int

    Returns
    -------
    MantelTest
        NaN statistics with fewer than 3 contexts or a constant matrix.
    """
    if alternative not in ("greater", "two-sided"):
        raise ValueError(f"alternative must be 'greater' or 'two-sided', got {alternative!r}")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = len(a)
    iu = np.triu_indices(n, 1)
    if n < 3:
        return _nan_mantel(n, alternative)
    ra_vals, rb_vals = average_ranks(a[iu]), average_ranks(b[iu])
    if ra_vals.std() == 0 or rb_vals.std() == 0:
        return _nan_mantel(n, alternative)
    # Permuting contexts permutes the pair values, so the ranks of a permuted matrix are the permuted ranks.
    rb = np.zeros((n, n))
    rb[iu] = rb_vals
    rb = rb + rb.T
    za = (ra_vals - ra_vals.mean()) / ra_vals.std()
    observed = float(np.mean(za * (rb_vals - rb_vals.mean()) / rb_vals.std()))
    rng = np.random.default_rng(seed)
    exact = math.factorial(n) <= permutations
    orders = (np.array(list(all_permutations(range(n)))) if exact
              else np.array([rng.permutation(n) for _ in range(permutations)]))
    chunk = max(1, int(4_000_000 // len(za)))                         # bounded memory for many contexts
    null = np.concatenate([_null_block(rb, orders[s:s + chunk], iu, za) for s in range(0, len(orders), chunk)])
    tol = 1e-12
    extreme = (null >= observed - tol) if alternative == "greater" else (np.abs(null) >= abs(observed) - tol)
    if exact:
        p = float(extreme.mean())
    else:
        p = float((1 + extreme.sum()) / (1 + len(null)))
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, n, n)
        i, j = np.triu_indices(n, 1)
        ok = pick[i] != pick[j]
        if ok.sum() >= 3:
            boots.append(spearman(a[pick[i][ok], pick[j][ok]], b[pick[i][ok], pick[j][ok]]))
    boots = np.asarray([x for x in boots if np.isfinite(x)], np.float64)
    low, high = (np.quantile(boots, [0.025, 0.975]) if len(boots) else (np.nan, np.nan))
    return MantelTest(observed, p, len(null), exact, float(null.mean()), float(np.quantile(null, 0.025)),
                      float(np.quantile(null, 0.975)),
                      Interval(observed, float(low), float(high), 0.95, "bootstrap-contexts", n), len(za), alternative)


# -------------------------------------------------------------------------------------------- result
@dataclass
class LayerContextAttentionRouting:
    """At one layer: the token's attention similarity and routing similarity across contexts, and their Mantel test.

    Attributes
    ----------
    layer : int
    attention_similarity, routing_similarity : np.ndarray
        float64 [n, n] over the contexts.
    mantel : MantelTest
    q_value : float
        Benjamini-Hochberg q of the Mantel p across the analysed layers.
    mean_attention_similarity, mean_routing_similarity : float
        Means over context pairs.
    distinct_primary : int
        Distinct primary experts of the token over the contexts.
    """

    layer: int
    attention_similarity: np.ndarray
    routing_similarity: np.ndarray
    mantel: MantelTest
    q_value: float
    mean_attention_similarity: float
    mean_routing_similarity: float
    distinct_primary: int

    def to_dict(self) -> dict:
        return {"layer": self.layer, "mantel": self.mantel.to_dict(), "q_value": self.q_value,
                "mean_attention_similarity": self.mean_attention_similarity,
                "mean_routing_similarity": self.mean_routing_similarity, "distinct_primary": self.distinct_primary,
                "attention_similarity": np.round(self.attention_similarity, 6).tolist(),
                "routing_similarity": np.round(self.routing_similarity, 6).tolist()}


@dataclass
class ContextAttentionRouting:
    """One token in N contexts: per layer, does attention similarity go with routing similarity?

    Attributes
    ----------
    token : str
    contexts : list of str
        One per item (the context text, or the occurrence's surroundings).
    experts : dict[int, np.ndarray]
        Layer -> int [n, k] the token's experts in each context.
    layers : list of LayerContextAttentionRouting
    attention_similarity, routing_similarity : str
        How each matrix was formed.
    """

    token: str
    contexts: list[str]
    experts: dict[int, np.ndarray]
    layers: list[LayerContextAttentionRouting]
    attention_similarity: str
    routing_similarity: str
    definitions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"token": self.token, "contexts": self.contexts, "attention_similarity": self.attention_similarity,
                "routing_similarity": self.routing_similarity, "definitions": self.definitions,
                "experts": {str(l): e.tolist() for l, e in self.experts.items()},
                "layers": [l.to_dict() for l in self.layers]}

    def tables(self) -> dict[str, list[dict]]:
        """CSV: ``layers`` (one row per layer) and ``pairs`` (one row per layer and context pair)."""
        rows, pairs = [], []
        for l in self.layers:
            m = l.mantel
            rows.append({"layer": l.layer, "spearman": m.statistic, "ci_low": m.interval.low, "ci_high": m.interval.high,
                         "p_value": m.p_value, "q_value": l.q_value, "null_mean": m.null_mean, "null_low": m.null_low,
                         "null_high": m.null_high, "mean_attention_similarity": l.mean_attention_similarity,
                         "mean_routing_similarity": l.mean_routing_similarity, "distinct_primary": l.distinct_primary})
            for i, j in zip(*np.triu_indices(len(self.contexts), 1)):
                pairs.append({"layer": l.layer, "i": int(i), "j": int(j),
                              "attention_similarity": float(l.attention_similarity[i, j]),
                              "routing_similarity": float(l.routing_similarity[i, j])})
        return {"layers": rows, "pairs": pairs}


DEFINITIONS = {
    "output": "cosine of the token's attention-output vectors (the self-attention block's output at its position)",
    "rows": "cosine of its head-mean attention rows aligned by distance (weight on the token d positions back)",
    "jaccard": "Jaccard overlap of the top-k expert sets",
    "probability": "Pearson correlation of the router probability vectors over all experts",
    "mantel": "Spearman over context pairs i < j; p from permuting the contexts of the routing matrix",
}


def context_attention_routing(token: str, contexts: Sequence[str], attention: dict[int, np.ndarray],
                              experts: dict[int, np.ndarray], *, probabilities: dict[int, np.ndarray] | None = None,
                              attention_similarity: str = "output", routing_similarity: str = "jaccard",
                              permutations: int = 999, alternative: str = "greater",
                              seed: int = 0) -> ContextAttentionRouting:
    """Per layer, the Mantel test between the token's attention similarity and routing similarity over contexts.

    Parameters
    ----------
    token : str
    contexts : sequence of str
        n labels, one per context.
    attention : dict[int, np.ndarray]
        Layer -> float [n, d] the token's attention representation per context (attention output, or
        :func:`offset_profiles` of its attention rows).
    experts : dict[int, np.ndarray]
        Layer -> int [n, k] its experts.
    probabilities : dict[int, np.ndarray], optional
        Layer -> float [n, E] router probabilities (needed for ``routing_similarity="probability"``).
    attention_similarity : {"output", "rows"}
        Recorded in the result (the vectors are compared by cosine either way).
    routing_similarity : {"jaccard", "probability"}
    permutations, alternative, seed
        See :func:`mantel_test`.

    Returns
    -------
    ContextAttentionRouting
    """
    if attention_similarity not in ATTENTION_SIMILARITIES:
        raise ValueError(f"--attention-similarity must be one of {ATTENTION_SIMILARITIES}, got {attention_similarity!r}")
    if routing_similarity not in ROUTING_SIMILARITIES:
        raise ValueError(f"--routing-similarity must be one of {ROUTING_SIMILARITIES}, got {routing_similarity!r}")
    if routing_similarity == "probability" and probabilities is None:
        raise ValueError("routing_similarity='probability' needs the router probabilities")
    n = len(contexts)
    if n < 3:
        raise ValueError(f"the Mantel test needs the token in at least 3 contexts, got {n}: give more --contexts")
    layers = sorted(attention)
    partial = []
    for l in layers:
        att = cosine_matrix(attention[l])
        rout = jaccard_matrix(experts[l]) if routing_similarity == "jaccard" else correlation_matrix(probabilities[l])
        iu = np.triu_indices(n, 1)
        partial.append((l, att, rout, mantel_test(att, rout, permutations=permutations, alternative=alternative,
                                                  seed=seed + l), float(att[iu].mean()), float(rout[iu].mean())))
    q = benjamini_hochberg(np.array([p[3].p_value for p in partial]))
    out = [LayerContextAttentionRouting(l, att, rout, m, float(qq), ma, mr, int(len(np.unique(experts[l][:, 0]))))
           for (l, att, rout, m, ma, mr), qq in zip(partial, q)]
    return ContextAttentionRouting(token, list(contexts), {l: np.asarray(experts[l]) for l in layers}, out,
                                   attention_similarity, routing_similarity,
                                   {"attention": DEFINITIONS[attention_similarity],
                                    "routing": DEFINITIONS[routing_similarity], "mantel": DEFINITIONS["mantel"]})


def router_probabilities(logits: np.ndarray, scoring: str) -> np.ndarray:
    """float64 [n, E]: softmax over the experts (``scoring="softmax"``) or elementwise sigmoid of raw logits."""
    z = np.asarray(logits, np.float64)
    if scoring == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
