"""Per (layer, expert) trigram concentration against a null model (the layer's own trigram distribution)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lazarus_core.tokens.types import trigram_name
from lazarus_core.trigram.stats import benjamini_hochberg, binom_sf


@dataclass
class PatternCount:
    """One trigram of an expert: how often, its share of the expert's tokens, and the layer's share."""

    trigram: str
    count: int
    share: float
    layer_share: float
    lift: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExpertSpecialisation:
    """Trigram specialisation of one expert at one layer.

    Attributes
    ----------
    layer, expert : int
    activations : int
        Tokens routed to the expert (in the counted slots).
    top_pattern : str
        Its most frequent trigram.
    concentration : float
        Share of its tokens with ``top_pattern`` (the reference toolkit's number).
    expected : float
        The concentration expected for that pattern if the expert drew its tokens from the layer's
        overall trigram distribution (= the pattern's share of all the layer's routed tokens).
    lift : float
        ``concentration / expected``.
    p_value : float
        One-sided binomial test of the top count against ``expected``, Bonferroni-corrected over the
        trigrams observed (the top pattern is chosen after looking). With permutations, the
        permutation p-value of the expert's maximum concentration instead.
    q_value : float
        Benjamini-Hochberg over every (layer, expert) of the analysis.
    null_max_concentration : float or None
        Mean maximum concentration of the expert under permutations (when run).
    top_patterns : list of PatternCount
    """

    layer: int
    expert: int
    activations: int
    top_pattern: str | None
    concentration: float
    expected: float
    lift: float
    p_value: float
    q_value: float = float("nan")
    null_max_concentration: float | None = None
    top_patterns: list[PatternCount] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top_patterns"] = [p.to_dict() for p in self.top_patterns]
        return d


@dataclass
class LayerSpecialisation:
    """All experts of one layer, and how much the expert choice says about the trigram.

    Attributes
    ----------
    mutual_information_bits : float
        ``I(expert; trigram)`` over routed (token, slot) pairs, in bits.
    normalized_mutual_information : float
        ``I / H(trigram)`` (0: the expert says nothing about the trigram; 1: it determines it).
    """

    layer: int
    num_tokens: int
    mutual_information_bits: float
    normalized_mutual_information: float
    experts: list[ExpertSpecialisation]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "num_tokens": self.num_tokens,
                "mutual_information_bits": self.mutual_information_bits,
                "normalized_mutual_information": self.normalized_mutual_information,
                "experts": [e.to_dict() for e in self.experts]}


@dataclass
class SpecialisationReport:
    """Trigram specialisation of every requested layer."""

    view: str
    slots: str
    test: str
    permutations: int
    num_tokens: int
    num_trigrams: int
    layers: list[LayerSpecialisation]

    def experts(self) -> list[ExpertSpecialisation]:
        return [e for layer in self.layers for e in layer.experts]

    def significant(self, alpha: float = 0.05) -> list[ExpertSpecialisation]:
        """Experts with q-value below ``alpha``, strongest lift first."""
        return sorted((e for e in self.experts() if e.q_value < alpha), key=lambda e: (-e.lift, e.q_value))

    def to_dict(self) -> dict:
        return {"view": self.view, "slots": self.slots, "test": self.test, "permutations": self.permutations,
                "num_tokens": self.num_tokens, "num_trigrams": self.num_trigrams,
                "layers": [l.to_dict() for l in self.layers]}


def expert_trigram_counts(trigrams: np.ndarray, topk_ids: np.ndarray, num_experts: int,
                          num_trigrams: int) -> np.ndarray:
    """Counts of (expert, trigram) over routed (token, slot) pairs.

    Parameters
    ----------
    trigrams : np.ndarray
        int [N] compact trigram index in ``[0, num_trigrams)``.
    topk_ids : np.ndarray
        int [N, s] experts of the counted slots.

    Returns
    -------
    np.ndarray
        int64 [E, U].
    """
    # Trigram-major flat index: when tokens come sorted by trigram (as trigram_specialisation passes
    # them) consecutive writes land in one small window of the histogram, which keeps it in cache.
    flat = (trigrams.astype(np.int64)[:, None] * num_experts + topk_ids).reshape(-1)
    return np.bincount(flat, minlength=num_experts * num_trigrams).reshape(num_trigrams, num_experts).T


def _mutual_information(counts: np.ndarray) -> tuple[float, float]:
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    def entropy(c: np.ndarray) -> float:
        c = c[c > 0].astype(np.float64)
        return float(np.log2(total) - (c * np.log2(c)).sum() / total)

    ht = entropy(counts.sum(0))
    mi = entropy(counts.sum(1)) + ht - entropy(counts.reshape(-1))
    return mi, (mi / ht if ht > 0 else 0.0)


def _max_concentration(counts: np.ndarray) -> np.ndarray:
    n = counts.sum(1)
    return np.where(n > 0, counts.max(1) / np.maximum(n, 1), 0.0)


def trigram_specialisation(trigrams: np.ndarray, layers: dict[int, np.ndarray], num_experts: int, *,
                           view: str = "semantic", slots: str = "all", permutations: int = 0, top: int = 3,
                           min_activations: int = 5, seed: int = 0) -> SpecialisationReport:
    """Trigram concentration of every expert of every layer, with a null model and significance.

    For expert ``e`` of a layer, with ``n_e`` routed tokens, of which ``c_e`` carry its most frequent
    trigram ``t*``: concentration ``c_e / n_e``; expected ``p(t*)``, the share of ``t*`` among all the
    layer's routed tokens (what the expert would see if it drew tokens from the layer's distribution);
    p-value ``min(1, U * P[Binomial(n_e, p(t*)) >= c_e])`` over ``U`` observed trigrams, or with
    ``permutations > 0`` the share of token-shuffled routings (expert loads and trigram distribution
    kept) in which the expert's maximum concentration reaches the observed one. q-values are
    Benjamini-Hochberg over all (layer, expert). Experts with fewer than ``min_activations`` tokens
    get p = 1.

    Parameters
    ----------
    trigrams : np.ndarray
        int [N] trigram ids (``lazarus_core.trigram.labels.trigram_ids``).
    layers : dict[int, np.ndarray]
        Layer index -> int [N, k] ``topk_ids`` (sorted by weight, descending).
    num_experts : int
    view : str
        Recorded in the report.
    slots : {'all', 'primary'}
        Count every selected expert or only the primary (highest-weight) one.
    permutations : int
        Permutation test rounds (0: binomial test).
    top : int
        Patterns listed per expert.
    min_activations : int
    seed : int

    Returns
    -------
    SpecialisationReport

    Raises
    ------
    ValueError
        Shapes disagree, an expert id is out of range, or ``slots`` is unknown.
    """
    if slots not in ("all", "primary"):
        raise ValueError(f"--slots must be 'all' or 'primary', got {slots!r}")
    trigrams = np.asarray(trigrams)
    order = np.argsort(trigrams, kind="stable")          # tokens grouped by trigram (cache-friendly counting)
    ordered = trigrams[order]
    starts = np.ones(len(ordered), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    uniq = ordered[starts]
    compact = np.cumsum(starts, dtype=np.int64) - 1
    u = len(uniq)
    rng = np.random.default_rng(seed)
    results: list[LayerSpecialisation] = []
    for layer, ids in layers.items():
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] != len(trigrams):
            raise ValueError(f"layer {layer}: topk_ids has shape {ids.shape}, expected [{len(trigrams)}, k]")
        if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
            raise ValueError(f"layer {layer}: expert ids outside [0, {num_experts})")
        used = (ids[:, :1] if slots == "primary" else ids)[order]
        counts = expert_trigram_counts(compact, used, num_experts, u)
        n = counts.sum(1)
        layer_p = counts.sum(0) / max(counts.sum(), 1)
        top_t = counts.argmax(1)
        top_c = counts[np.arange(num_experts), top_t]
        conc = np.where(n > 0, top_c / np.maximum(n, 1), 0.0)
        expected = layer_p[top_t]
        observed_u = int((layer_p > 0).sum())
        null_max = None
        if permutations > 0:
            obs_max = _max_concentration(counts)
            exceed = np.zeros(num_experts)
            total_max = np.zeros(num_experts)
            for _ in range(permutations):
                perm = compact[rng.permutation(len(compact))]
                m = _max_concentration(expert_trigram_counts(perm, used, num_experts, u))
                exceed += m >= obs_max - 1e-12
                total_max += m
            p = (1.0 + exceed) / (1.0 + permutations)
            null_max = total_max / permutations
        else:
            p = np.minimum(1.0, observed_u * binom_sf(top_c, n, expected))
        p = np.where(n >= min_activations, p, 1.0)
        mi, nmi = _mutual_information(counts)
        k_top = min(top, u)
        part = np.argpartition(-counts, k_top - 1, axis=1)[:, :k_top] if k_top < u else np.tile(np.arange(u), (num_experts, 1))
        best = np.take_along_axis(part, np.argsort(-np.take_along_axis(counts, part, 1), axis=1, kind="stable"), 1)
        experts = []
        for e in range(num_experts):
            pats = [PatternCount(trigram_name(uniq[t]), int(counts[e, t]), float(counts[e, t] / n[e]),
                                 float(layer_p[t]), float(counts[e, t] / n[e] / layer_p[t]))
                    for t in best[e] if n[e] > 0 and counts[e, t] > 0]
            experts.append(ExpertSpecialisation(
                layer=int(layer), expert=e, activations=int(n[e]),
                top_pattern=trigram_name(uniq[top_t[e]]) if n[e] > 0 else None,
                concentration=float(conc[e]), expected=float(expected[e]) if n[e] > 0 else 0.0,
                lift=float(conc[e] / expected[e]) if n[e] > 0 and expected[e] > 0 else 0.0,
                p_value=float(p[e]), null_max_concentration=None if null_max is None else float(null_max[e]),
                top_patterns=pats))
        results.append(LayerSpecialisation(int(layer), int(len(trigrams)), mi, nmi, experts))
    all_experts = [e for l in results for e in l.experts]
    q = benjamini_hochberg(np.array([e.p_value for e in all_experts]))
    for e, qv in zip(all_experts, q):
        e.q_value = float(qv)
    return SpecialisationReport(view=view, slots=slots, test="permutation" if permutations else "binomial",
                                permutations=permutations, num_tokens=int(len(trigrams)), num_trigrams=u,
                                layers=results)
