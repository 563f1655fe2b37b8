"""Per (layer, expert) trigram concentration against the layer's trigram distribution and beyond the token itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lazarus_core.tokens.types import ALL_TYPES, NUM_TYPES, trigram_name
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
class CausalPattern:
    """The causal pattern ``PREV→CUR`` of one expert: what a causal router can see (never NEXT).

    Attributes mirror :class:`ExpertSpecialisation`'s for the expert's most frequent ``PREV→CUR`` pattern.
    """

    pattern: str | None
    concentration: float
    expected: float
    lift: float
    p_value: float
    expected_given_type: float
    expected_given_token: float | None
    context_lift: float
    context_p_value: float
    context_q_value: float = float("nan")

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
        trigrams observed (the top pattern is chosen after looking). It does not condition on the
        token itself: an expert that receives NUM tokens is "significant" on ``X→NUM→Y``.
    q_value : float
        Benjamini-Hochberg over every (layer, expert) of the analysis.
    expected_given_type : float
        The concentration expected if the expert drew its tokens from the layer with its own mix of
        current-token types: ``mean_i P(top_pattern | type of token i)`` over its tokens.
    expected_given_token : float or None
        The same with current token ids (None when the analysis was not given token ids).
    context_lift : float
        ``concentration / expected_given_token`` (``/ expected_given_type`` without token ids): the
        specialisation left beyond the token itself.
    context_p_value : float
        Test of that excess. Binomial (``n``, ``expected_given_*``) tail, which bounds the exact
        Poisson-binomial tail from above (conservative), Bonferroni-corrected over the observed
        trigrams; with permutations, the share of within-token shuffles of expert assignments (tokens of
        the same id, or type, swap their experts: loads and token identity kept, context broken) whose
        maximum concentration reaches the observed one.
    context_q_value : float
        Benjamini-Hochberg of ``context_p_value`` over every (layer, expert) of the analysis.
    null_max_concentration : float or None
        Mean maximum concentration of the expert under the within-token permutations (when run).
    causal : CausalPattern or None
        The same statistics for the expert's most frequent causal pattern ``PREV→CUR``.
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
    expected_given_type: float = float("nan")
    expected_given_token: float | None = None
    context_lift: float = float("nan")
    context_p_value: float = 1.0
    context_q_value: float = float("nan")
    null_max_concentration: float | None = None
    causal: CausalPattern | None = None
    top_patterns: list[PatternCount] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top_patterns"] = [p.to_dict() for p in self.top_patterns]
        d["causal"] = self.causal.to_dict() if self.causal else None
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
    shuffled_nmi : float
        The same with the trigram labels shuffled over tokens (mean of 5 shuffles): what a finite
        sample gives with no association at all (the plug-in estimator is biased upwards).
    nmi_excess : float
        ``normalized_mutual_information - shuffled_nmi``.
    """

    layer: int
    num_tokens: int
    mutual_information_bits: float
    normalized_mutual_information: float
    experts: list[ExpertSpecialisation]
    shuffled_nmi: float = float("nan")
    nmi_excess: float = float("nan")

    def to_dict(self) -> dict:
        return {"layer": self.layer, "num_tokens": self.num_tokens,
                "mutual_information_bits": self.mutual_information_bits,
                "normalized_mutual_information": self.normalized_mutual_information,
                "shuffled_nmi": self.shuffled_nmi, "nmi_excess": self.nmi_excess,
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
    condition: str = "type"

    def experts(self) -> list[ExpertSpecialisation]:
        return [e for layer in self.layers for e in layer.experts]

    def significant(self, alpha: float = 0.05, *, context: bool = False) -> list[ExpertSpecialisation]:
        """Experts with q-value (``context``: context q-value) below ``alpha``, strongest lift first."""
        if context:
            return sorted((e for e in self.experts() if e.context_q_value < alpha),
                          key=lambda e: (-e.context_lift, e.context_q_value))
        return sorted((e for e in self.experts() if e.q_value < alpha), key=lambda e: (-e.lift, e.q_value))

    def to_dict(self) -> dict:
        return {"view": self.view, "slots": self.slots, "test": self.test, "permutations": self.permutations,
                "condition": self.condition, "num_tokens": self.num_tokens, "num_trigrams": self.num_trigrams,
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



def _compact(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique values ascending, compact index int64 [N] into them)."""
    uniq, inverse = np.unique(np.asarray(values), return_inverse=True)
    return uniq, inverse.astype(np.int64).reshape(-1)


def _expected_given(compact: np.ndarray, used: np.ndarray, top: np.ndarray, n: np.ndarray, groups: np.ndarray,
                    num_groups: int, num_experts: int) -> np.ndarray:
    """Per expert e: ``mean over e's routed (token, slot) pairs of P(top[e] | group of the token)``.

    ``P(t | g)`` is the share of the layer's tokens of group ``g`` (a token id or a type) whose pattern
    is ``t``: the concentration an expert would show if it drew its tokens at random among those of
    the same group, i.e. with no preference beyond the group.
    """
    size = np.bincount(groups, minlength=num_groups).astype(np.float64)
    flat_e = used.reshape(-1)
    rows = np.repeat(np.arange(used.shape[0]), used.shape[1])
    out = np.zeros(num_experts)
    for t in np.unique(top[n > 0]):
        share = np.bincount(groups, weights=(compact == t).astype(np.float64), minlength=num_groups) / np.maximum(size, 1)
        sums = np.bincount(flat_e, weights=share[groups][rows], minlength=num_experts)
        chosen = np.flatnonzero((top == t) & (n > 0))
        out[chosen] = sums[chosen] / n[chosen]
    return out


def _within_group_permutation(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation ``perm`` with ``groups[perm] == groups``: token i takes the experts of token perm[i]."""
    order = np.argsort(groups, kind="stable")
    shuffled = np.lexsort((rng.random(len(groups)), groups))
    perm = np.empty_like(order)
    perm[order] = shuffled
    return perm


@dataclass
class _PatternStats:
    counts: np.ndarray          # int64 [E, U]
    n: np.ndarray               # [E]
    top: np.ndarray             # [E] compact pattern index
    concentration: np.ndarray
    expected: np.ndarray
    p_value: np.ndarray
    given_type: np.ndarray
    given_token: np.ndarray | None
    context_p: np.ndarray
    null_max: np.ndarray | None = None

    @property
    def context_expected(self) -> np.ndarray:
        return self.given_token if self.given_token is not None else self.given_type


def _pattern_stats(compact: np.ndarray, u: int, used: np.ndarray, num_experts: int, type_groups: np.ndarray,
                   token_groups: np.ndarray | None, min_activations: int) -> _PatternStats:
    counts = expert_trigram_counts(compact, used, num_experts, u)
    n = counts.sum(1)
    layer_p = counts.sum(0) / max(counts.sum(), 1)
    top = counts.argmax(1)
    top_c = counts[np.arange(num_experts), top]
    conc = np.where(n > 0, top_c / np.maximum(n, 1), 0.0)
    expected = layer_p[top]
    observed_u = int((layer_p > 0).sum())
    p = np.where(n >= min_activations, np.minimum(1.0, observed_u * binom_sf(top_c, n, expected)), 1.0)
    given_type = _expected_given(compact, used, top, n, type_groups, int(type_groups.max()) + 1, num_experts)
    given_token = None
    if token_groups is not None:
        given_token = _expected_given(compact, used, top, n, token_groups, int(token_groups.max()) + 1, num_experts)
    ctx = given_token if given_token is not None else given_type
    # Binomial with the mean of the Poisson-binomial: its upper tail bounds the exact one (conservative).
    ctx_p = np.where(n >= min_activations, np.minimum(1.0, observed_u * binom_sf(top_c, n, np.clip(ctx, 0.0, 1.0))), 1.0)
    return _PatternStats(counts, n, top, conc, expected, p, given_type, given_token, ctx_p)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else 0.0


def trigram_specialisation(trigrams: np.ndarray, layers: dict[int, np.ndarray], num_experts: int, *,
                           token_ids: np.ndarray | None = None, view: str = "semantic", slots: str = "all",
                           permutations: int = 0, top: int = 3, min_activations: int = 5,
                           seed: int = 0) -> SpecialisationReport:
    """Trigram concentration of every expert of every layer, against the layer and beyond the token itself.

    For expert ``e`` of a layer, with ``n_e`` routed tokens, of which ``c_e`` carry its most frequent
    trigram ``t*``: concentration ``c_e / n_e``; expected ``p(t*)``, the share of ``t*`` among all the
    layer's routed tokens; p-value ``min(1, U * P[Binomial(n_e, p(t*)) >= c_e])`` over ``U`` observed
    trigrams. Since a trigram contains the token's own type, that null is beaten by any expert that
    receives particular tokens; the context statistics condition on the token: ``expected_given_token``
    (``_type``) is the concentration expected if the expert drew its tokens among the layer's tokens
    of the same id (type) at random, ``context_lift = c_e / n_e / expected_given_token`` and
    ``context_p_value`` tests that excess (binomial bound, or with ``permutations > 0`` the within-token
    shuffle of expert assignments). The same is reported for the causal pattern ``PREV→CUR`` (a causal
    router never sees NEXT). q-values are Benjamini-Hochberg over all (layer, expert). Experts with
    fewer than ``min_activations`` tokens get p = 1.

    Parameters
    ----------
    trigrams : np.ndarray
        int [N] trigram ids (``lazarus_core.trigram.labels.trigram_ids``).
    layers : dict[int, np.ndarray]
        Layer index -> int [N, k] ``topk_ids`` (sorted by weight, descending).
    num_experts : int
    token_ids : np.ndarray, optional
        int [N], the tokens' ids: the context statistics then condition on the token id (else on its type).
    view : str
        Recorded in the report.
    slots : {'all', 'primary'}
        Count every selected expert or only the primary (highest-weight) one.
    permutations : int
        Within-token permutation rounds for the context test (0: binomial bound).
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
    trigrams = np.asarray(trigrams).astype(np.int64)
    if token_ids is not None and len(token_ids) != len(trigrams):
        raise ValueError(f"token_ids has {len(token_ids)} entries, trigrams {len(trigrams)}")
    uniq, compact = _compact(trigrams)
    u = len(uniq)
    causal_uniq, causal_compact = _compact(trigrams // NUM_TYPES)      # PREV→CUR
    cu = len(causal_uniq)
    type_groups = (trigrams // NUM_TYPES) % NUM_TYPES
    token_groups = _compact(token_ids)[1] if token_ids is not None else None
    perm_groups = token_groups if token_groups is not None else type_groups
    rng = np.random.default_rng(seed)
    results: list[LayerSpecialisation] = []
    for layer, ids in layers.items():
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] != len(trigrams):
            raise ValueError(f"layer {layer}: topk_ids has shape {ids.shape}, expected [{len(trigrams)}, k]")
        if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
            raise ValueError(f"layer {layer}: expert ids outside [0, {num_experts})")
        used = ids[:, :1] if slots == "primary" else ids
        tri = _pattern_stats(compact, u, used, num_experts, type_groups, token_groups, min_activations)
        cau = _pattern_stats(causal_compact, cu, used, num_experts, type_groups, token_groups, min_activations)
        if permutations > 0:
            for stats in (tri, cau):
                stats.null_max = np.zeros(num_experts)
            obs = (_max_concentration(tri.counts), _max_concentration(cau.counts))
            exceed = (np.zeros(num_experts), np.zeros(num_experts))
            for _ in range(permutations):
                shuffled = used[_within_group_permutation(perm_groups, rng)]
                for i, (stats, comp, size) in enumerate(((tri, compact, u), (cau, causal_compact, cu))):
                    m = _max_concentration(expert_trigram_counts(comp, shuffled, num_experts, size))
                    exceed[i][:] += m >= obs[i] - 1e-12
                    stats.null_max += m
            for i, stats in enumerate((tri, cau)):
                stats.null_max /= permutations
                stats.context_p = np.where(stats.n >= min_activations, (1.0 + exceed[i]) / (1.0 + permutations), 1.0)
        counts, n = tri.counts, tri.n
        mi, nmi = _mutual_information(counts)
        shuffled_nmi = float(np.mean([_mutual_information(expert_trigram_counts(
            compact[rng.permutation(len(compact))], used, num_experts, u))[1] for _ in range(5)]))
        layer_p = counts.sum(0) / max(counts.sum(), 1)
        k_top = min(top, u)
        part = np.argpartition(-counts, k_top - 1, axis=1)[:, :k_top] if k_top < u else np.tile(np.arange(u), (num_experts, 1))
        best = np.take_along_axis(part, np.argsort(-np.take_along_axis(counts, part, 1), axis=1, kind="stable"), 1)
        experts = []
        for e in range(num_experts):
            live = n[e] > 0
            pats = [PatternCount(trigram_name(uniq[t]), int(counts[e, t]), float(counts[e, t] / n[e]),
                                 float(layer_p[t]), float(counts[e, t] / n[e] / layer_p[t]))
                    for t in best[e] if live and counts[e, t] > 0]
            causal = None
            if live:
                prev, cur = divmod(int(causal_uniq[cau.top[e]]), NUM_TYPES)
                causal = CausalPattern(
                    pattern=f"{ALL_TYPES[prev]}→{ALL_TYPES[cur]}", concentration=float(cau.concentration[e]),
                    expected=float(cau.expected[e]), lift=_ratio(cau.concentration[e], cau.expected[e]),
                    p_value=float(cau.p_value[e]), expected_given_type=float(cau.given_type[e]),
                    expected_given_token=None if cau.given_token is None else float(cau.given_token[e]),
                    context_lift=_ratio(cau.concentration[e], cau.context_expected[e]),
                    context_p_value=float(cau.context_p[e]))
            experts.append(ExpertSpecialisation(
                layer=int(layer), expert=e, activations=int(n[e]),
                top_pattern=trigram_name(uniq[tri.top[e]]) if live else None,
                concentration=float(tri.concentration[e]), expected=float(tri.expected[e]) if live else 0.0,
                lift=_ratio(tri.concentration[e], tri.expected[e]) if live else 0.0,
                p_value=float(tri.p_value[e]),
                expected_given_type=float(tri.given_type[e]) if live else 0.0,
                expected_given_token=None if tri.given_token is None else float(tri.given_token[e]),
                context_lift=_ratio(tri.concentration[e], tri.context_expected[e]) if live else 0.0,
                context_p_value=float(tri.context_p[e]),
                null_max_concentration=None if tri.null_max is None else float(tri.null_max[e]),
                causal=causal, top_patterns=pats))
        results.append(LayerSpecialisation(int(layer), int(len(trigrams)), mi, nmi, experts, shuffled_nmi,
                                           nmi - shuffled_nmi))
    all_experts = [e for l in results for e in l.experts]
    for attr, values in (("q_value", [e.p_value for e in all_experts]),
                         ("context_q_value", [e.context_p_value for e in all_experts])):
        for e, qv in zip(all_experts, benjamini_hochberg(np.array(values))):
            setattr(e, attr, float(qv))
    causal_experts = [e for e in all_experts if e.causal is not None]
    if causal_experts:
        for e, qv in zip(causal_experts, benjamini_hochberg(np.array([e.causal.context_p_value for e in causal_experts]))):
            e.causal.context_q_value = float(qv)
    return SpecialisationReport(view=view, slots=slots, test="permutation" if permutations else "binomial",
                                permutations=permutations, num_tokens=int(len(trigrams)), num_trigrams=u,
                                layers=results, condition="token" if token_ids is not None else "type")
