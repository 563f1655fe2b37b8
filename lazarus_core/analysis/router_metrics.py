"""The OLMoE paper's router metrics per layer (selection frequency, domain and vocabulary specialisation, token
overlap, co-activation, saturation between two traces), each next to the value it would have by chance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from lazarus_core.analysis.intervals import Interval, bootstrap_mean_ci
from lazarus_core.analysis.router_entropy import (DocumentBootstrap, bootstrap_ratio_columns, check_layers,
                                                  document_index)
from lazarus_core.trigram.stats import topk_pair_null
from lazarus_core.trigram.usage import coactivation_matrix

DEFAULT_MIN_COUNT = 10     # OLMoE lists a token id's experts when it occurs at least 10 times
DEFAULT_PERMUTATIONS = 10


def _r(values, digits: int = 6) -> list:
    flat = np.asarray(values, dtype=np.float64).ravel()
    return [None if not np.isfinite(v) else round(float(v), digits) for v in flat]


def _f(value, digits: int = 8):
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


# ------------------------------------------------------------------------------------------ results
@dataclass
class SelectionFrequency:
    """How often each expert is chosen, with document-bootstrap intervals.

    Attributes
    ----------
    any_slot : np.ndarray
        float64 [E], share of tokens whose top-k holds the expert (sums to k); baseline k/E.
    any_slot_low, any_slot_high : np.ndarray
        float64 [E], 95% interval bounds (bootstrap over documents).
    primary : np.ndarray
        float64 [E], share of tokens whose slot-0 expert it is (sums to 1); baseline 1/E.
    primary_low, primary_high : np.ndarray
    """

    any_slot: np.ndarray
    any_slot_low: np.ndarray
    any_slot_high: np.ndarray
    primary: np.ndarray
    primary_low: np.ndarray
    primary_high: np.ndarray

    def to_dict(self, k: int) -> dict:
        e = len(self.any_slot)
        return {"selection_frequency": _r(self.any_slot), "selection_frequency_ci_low": _r(self.any_slot_low),
                "selection_frequency_ci_high": _r(self.any_slot_high), "uniform_selection_frequency": k / e,
                "primary_frequency": _r(self.primary), "primary_frequency_ci_low": _r(self.primary_low),
                "primary_frequency_ci_high": _r(self.primary_high), "uniform_primary_frequency": 1.0 / e,
                "max_over_uniform": _f(self.any_slot.max() / (k / e)),
                "min_over_uniform": _f(self.any_slot.min() / (k / e))}


@dataclass
class DomainSpecialisation:
    """One domain's routing at one layer (OLMoE: share of the domain's tokens routed to each expert / (k/E)).

    Attributes
    ----------
    label : str
    num_tokens, num_documents : int
    share : np.ndarray
        float64 [E], share of the domain's tokens whose top-k holds the expert (sums to k).
    share_low, share_high : np.ndarray
        float64 [E], 95% bootstrap bounds over the domain's documents.
    specialisation : np.ndarray
        float64 [E], ``share / (k / E)``: 1 = the uniform expectation.
    lift_over_layer : np.ndarray
        float64 [E], ``share`` over the expert's selection frequency on all labelled tokens (1 = the
        domain is routed like the rest; keeps the expert's load).
    max_specialisation : float
        Largest ``specialisation`` over experts.
    max_specialisation_null : float
        Mean of that maximum when document labels are permuted among documents (documents kept whole,
        domain sizes kept): the maximum that noise and load alone produce.
    p_value : float
        Share of permutations whose maximum specialisation reaches the observed one (add-one).
    """

    label: str
    num_tokens: int
    num_documents: int
    share: np.ndarray
    share_low: np.ndarray
    share_high: np.ndarray
    specialisation: np.ndarray
    lift_over_layer: np.ndarray
    max_specialisation: float
    max_specialisation_null: float
    p_value: float

    def to_dict(self) -> dict:
        top = np.argsort(-self.specialisation)[:5]
        return {"label": self.label, "num_tokens": self.num_tokens, "num_documents": self.num_documents,
                "share": _r(self.share), "share_ci_low": _r(self.share_low), "share_ci_high": _r(self.share_high),
                "specialisation": _r(self.specialisation), "lift_over_layer": _r(self.lift_over_layer),
                "max_specialisation": _f(self.max_specialisation),
                "max_specialisation_null": _f(self.max_specialisation_null), "p_value": _f(self.p_value),
                "top_experts": [int(e) for e in top]}


@dataclass
class VocabularySpecialisation:
    """OLMoE's vocabulary specialisation: per token id, the largest share of its occurrences one expert gets as primary.

    Attributes
    ----------
    value : Interval
        Mean over token ids with at least ``min_count`` occurrences (unweighted, as OLMoE), with a
        bootstrap interval over those token ids.
    weighted : float
        The same mean weighted by occurrences.
    num_token_ids : int
        Token ids counted.
    min_count : int
    null_mean, null_low, null_high : float
        Mean and 2.5% / 97.5% quantiles of ``value`` when primary experts are permuted over the tokens
        (expert loads and token-id counts kept, their association broken).
    """

    value: Interval | None
    weighted: float
    num_token_ids: int
    min_count: int
    null_mean: float
    null_low: float
    null_high: float

    def to_dict(self) -> dict:
        return {"vocabulary_specialisation": None if self.value is None else _f(self.value.estimate),
                "vocabulary_specialisation_ci": None if self.value is None else self.value.to_dict(),
                "vocabulary_specialisation_weighted": _f(self.weighted), "num_token_ids": self.num_token_ids,
                "min_count": self.min_count, "vocabulary_specialisation_null": _f(self.null_mean),
                "vocabulary_specialisation_null_range": [_f(self.null_low), _f(self.null_high)]}


@dataclass
class TokenOverlap:
    """Jaccard overlap of the token-id sets that experts process (any slot).

    Attributes
    ----------
    matrix : np.ndarray
        float64 [E, E], |S_a ∩ S_b| / |S_a ∪ S_b| (diagonal 1 for a used expert).
    mean : float
        Mean over expert pairs a < b.
    null_mean, null_std : float
        The same mean when token ids are permuted over the tokens (each expert's load kept).
    """

    matrix: np.ndarray
    mean: float
    null_mean: float
    null_std: float

    def to_dict(self) -> dict:
        return {"token_overlap_mean": _f(self.mean), "token_overlap_null_mean": _f(self.null_mean),
                "token_overlap_null_std": _f(self.null_std),
                "token_overlap_matrix": [_r(row, 4) for row in self.matrix]}


@dataclass
class Coactivation:
    """OLMoE's co-activation: adjacent pairs of the logit-ordered top-k, divided by count(a).

    Attributes
    ----------
    matrix : np.ndarray
        float64 [E, E], row a: (tokens where b is next to a in the ordered top-k) / (tokens choosing a).
    baseline : np.ndarray
        float64 [E, E], the same if the order within each token's top-k were random (same sets):
        ``cochosen(a, b) * 2 / k / count(a)``, exact since two of k slots are adjacent with probability 2/k.
        For k = 2 every co-chosen pair is adjacent, so this equals ``matrix``; see ``independent``.
    independent : np.ndarray
        float64 [E, E], the same if each token's k experts were chosen independently of one another given
        the loads, in random order: ``P(a, b both chosen) * 2 / k / P(a chosen)``, with the exact pair
        probability of k distinct picks (:func:`lazarus_core.trigram.stats.topk_pair_null`).
    cochosen : np.ndarray
        int64 [E, E], tokens choosing both (any slots; :func:`lazarus_core.trigram.usage.coactivation_matrix`).
    """

    matrix: np.ndarray
    baseline: np.ndarray
    independent: np.ndarray
    cochosen: np.ndarray

    def top_pairs(self, n: int = 10) -> list[dict]:
        e = len(self.matrix)
        iu, ju = np.nonzero(~np.eye(e, dtype=bool))
        order = np.argsort(-self.matrix[iu, ju], kind="stable")[:n]
        return [{"a": int(iu[i]), "b": int(ju[i]), "coactivation": _f(self.matrix[iu[i], ju[i]]),
                 "baseline_random_order": _f(self.baseline[iu[i], ju[i]]),
                 "baseline_independent": _f(self.independent[iu[i], ju[i]])}
                for i in order if self.matrix[iu[i], ju[i]] > 0]

    def to_dict(self) -> dict:
        off = ~np.eye(len(self.matrix), dtype=bool)
        used = self.cochosen.diagonal() > 0
        best = np.where(off, self.matrix, -np.inf).max(1)[used] if used.any() else np.array([np.nan])
        best_null = np.where(off, self.baseline, -np.inf).max(1)[used] if used.any() else np.array([np.nan])
        best_ind = np.where(off, self.independent, -np.inf).max(1)[used] if used.any() else np.array([np.nan])
        return {"coactivation_max_mean": _f(best.mean()), "coactivation_max_mean_baseline": _f(best_null.mean()),
                "coactivation_max_mean_independent": _f(best_ind.mean()),
                "coactivation_top_pairs": self.top_pairs(),
                "coactivation_matrix": [_r(row, 4) for row in self.matrix]}


@dataclass
class Saturation:
    """OLMoE's router saturation between two traces of the same tokens at one layer.

    Attributes
    ----------
    topk : Interval
        Mean over tokens of |top-k(a) ∩ top-k(b)| / k, document-bootstrap interval.
    top1 : Interval
        Share of tokens with the same primary expert.
    topk_baseline : float
        Expected value for independent top-k sets with the two traces' selection frequencies f_a, f_b:
        sum_e f_a(e) f_b(e) / k (exact for any independent draw with those inclusion probabilities).
    top1_baseline : float
        sum_e p_a(e) p_b(e) over the primary frequencies.
    """

    topk: Interval
    top1: Interval
    topk_baseline: float
    top1_baseline: float

    def to_dict(self) -> dict:
        return {"router_saturation": _f(self.topk.estimate), "router_saturation_ci": self.topk.to_dict(),
                "router_saturation_baseline": _f(self.topk_baseline),
                "top1_agreement": _f(self.top1.estimate), "top1_agreement_ci": self.top1.to_dict(),
                "top1_agreement_baseline": _f(self.top1_baseline)}


@dataclass
class LayerMetrics:
    """Every router metric of one layer (see the dataclasses of each)."""

    layer: int
    num_tokens: int
    num_experts: int
    top_k: int
    selection: SelectionFrequency
    vocabulary: VocabularySpecialisation
    token_overlap: TokenOverlap | None
    coactivation: Coactivation
    domains: list[DomainSpecialisation] = field(default_factory=list)
    saturation: Saturation | None = None

    def to_dict(self) -> dict:
        out = {"layer": self.layer, "num_tokens": self.num_tokens, "num_experts": self.num_experts,
               "top_k": self.top_k, **self.selection.to_dict(self.top_k), **self.vocabulary.to_dict()}
        if self.token_overlap is not None:
            out.update(self.token_overlap.to_dict())
        out.update(self.coactivation.to_dict())
        out["domain_specialisation"] = [d.to_dict() for d in self.domains]
        out["saturation"] = None if self.saturation is None else self.saturation.to_dict()
        return out


@dataclass
class RouterMetrics:
    """:class:`LayerMetrics` of every requested layer of a trace."""

    family: str | None
    num_tokens: int
    min_count: int
    layers: list[LayerMetrics]
    compare_trace: str | None = None

    def layer(self, layer: int) -> LayerMetrics:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise ValueError(f"layer {layer} was not analysed; the layers are {[e.layer for e in self.layers]}")

    def to_dict(self) -> dict:
        return {"family": self.family, "num_tokens": self.num_tokens, "min_count": self.min_count,
                "compare_trace": self.compare_trace,
                "baselines": {
                    "selection_frequency": "k/E (uniform); primary_frequency: 1/E",
                    "domain_specialisation": "1 = share k/E (OLMoE); lift_over_layer 1 = the layer's own load; "
                                             "max_specialisation_null from permuting document labels",
                    "vocabulary_specialisation": "primary experts permuted over tokens (loads and token counts kept)",
                    "token_overlap": "token ids permuted over tokens (expert loads kept)",
                    "coactivation": "random order within each token's observed top-k (2/k of co-chosen pairs)",
                    "router_saturation": "independent top-k sets with the two traces' selection frequencies"},
                "layers": [entry.to_dict() for entry in self.layers]}


# --------------------------------------------------------------------------------------- functions
def selection_frequency(topk_ids: np.ndarray, num_experts: int, boot: DocumentBootstrap) -> SelectionFrequency:
    """Share of tokens choosing each expert (any slot and slot 0) with document-bootstrap intervals.

    Parameters
    ----------
    topk_ids : np.ndarray
        int [n, k], distinct experts per row, slot 0 the primary.
    num_experts : int
    boot : DocumentBootstrap
        The trace's documents (``boot.doc_index`` int [n]).
    """
    ids = np.asarray(topk_ids)
    n, k = ids.shape
    g = boot.n_docs
    doc = boot.doc_index.astype(np.int64)
    per_doc = np.bincount((doc[:, None] * num_experts + ids).ravel(), minlength=g * num_experts)
    per_doc = per_doc.reshape(g, num_experts).astype(np.float64)
    per_doc_primary = np.bincount(doc * num_experts + ids[:, 0], minlength=g * num_experts)
    per_doc_primary = per_doc_primary.reshape(g, num_experts).astype(np.float64)
    tokens = boot.tokens_per_doc
    low, high = boot.ratio_columns(per_doc, tokens)
    plow, phigh = boot.ratio_columns(per_doc_primary, tokens)
    return SelectionFrequency(per_doc.sum(0) / max(n, 1), low, high, per_doc_primary.sum(0) / max(n, 1), plow, phigh)


def vocabulary_specialisation(token_ids: np.ndarray, primary: np.ndarray, num_experts: int, *,
                              min_count: int = DEFAULT_MIN_COUNT, n_perm: int = DEFAULT_PERMUTATIONS, seed: int = 0,
                              n_boot: int = 1000) -> VocabularySpecialisation:
    """OLMoE's vocabulary specialisation of one layer, with a load-keeping permutation baseline.

    Parameters
    ----------
    token_ids : np.ndarray
        int [n], token id of each token.
    primary : np.ndarray
        int [n], its slot-0 expert.
    num_experts : int
    min_count : int
        Token ids with fewer occurrences are left out.
    n_perm : int
        Permutations of the primary experts over tokens for the baseline.

    Returns
    -------
    VocabularySpecialisation
        ``value`` None when no token id has ``min_count`` occurrences.
    """
    _, inverse = np.unique(np.asarray(token_ids), return_inverse=True)
    inverse = inverse.astype(np.int64)
    primary = np.asarray(primary, dtype=np.int64)
    n_ids = int(inverse.max()) + 1 if len(inverse) else 0
    occurrences = np.bincount(inverse, minlength=n_ids)
    keep = occurrences >= min_count
    if not keep.any():
        nan = float("nan")
        return VocabularySpecialisation(None, nan, 0, min_count, nan, nan, nan)

    def shares(experts: np.ndarray) -> np.ndarray:
        counts = np.bincount(inverse * num_experts + experts, minlength=n_ids * num_experts).reshape(n_ids, num_experts)
        return counts[keep].max(1) / occurrences[keep]

    observed = shares(primary)
    rng = np.random.default_rng(seed)
    null = np.array([shares(rng.permutation(primary)).mean() for _ in range(n_perm)]) if n_perm else np.array([np.nan])
    value = bootstrap_mean_ci(observed, None, n_boot=n_boot, seed=seed)
    weighted = float((observed * occurrences[keep]).sum() / occurrences[keep].sum())
    return VocabularySpecialisation(value, weighted, int(keep.sum()), int(min_count), float(null.mean()),
                                    float(np.quantile(null, 0.025)), float(np.quantile(null, 0.975)))


def token_overlap(token_ids: np.ndarray, topk_ids: np.ndarray, num_experts: int, *,
                  n_perm: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> TokenOverlap:
    """Jaccard overlap of the experts' token-id sets, with a token-permutation baseline.

    Parameters
    ----------
    token_ids : np.ndarray
        int [n].
    topk_ids : np.ndarray
        int [n, k].
    num_experts : int
    n_perm : int
        Permutations of token ids over tokens (each expert keeps its tokens' count).

    Returns
    -------
    TokenOverlap
    """
    _, inverse = np.unique(np.asarray(token_ids), return_inverse=True)
    inverse = inverse.astype(np.int64)
    ids = np.asarray(topk_ids, dtype=np.int64)
    n_ids = int(inverse.max()) + 1 if len(inverse) else 0
    iu = np.triu_indices(num_experts, 1)

    def jaccard(tokens: np.ndarray) -> np.ndarray:
        present = np.zeros(n_ids * num_experts, dtype=np.float32)
        present[(tokens[:, None] * num_experts + ids).ravel()] = 1.0
        present = torch.from_numpy(present.reshape(n_ids, num_experts))
        # torch's matmul, not numpy's: in a process that also runs torch, two BLAS thread pools compete
        inter = (present.T @ present).double().numpy()
        size = inter.diagonal()
        union = size[:, None] + size[None, :] - inter
        return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

    matrix = jaccard(inverse)
    rng = np.random.default_rng(seed)
    null = np.array([jaccard(rng.permutation(inverse))[iu].mean() for _ in range(n_perm)] or [np.nan])
    return TokenOverlap(matrix, float(matrix[iu].mean()) if len(iu[0]) else float("nan"), float(null.mean()),
                        float(null.std()))


def olmoe_coactivation(topk_ids: np.ndarray, num_experts: int) -> Coactivation:
    """OLMoE's co-activation: count adjacent pairs of the ordered top-k (both directions), divide row a by count(a).

    Parameters
    ----------
    topk_ids : np.ndarray
        int [n, k], in logit order (a trace's order by weight is the logit order in every family:
        the weight is monotone in the logit among the chosen experts).
    num_experts : int

    Returns
    -------
    Coactivation
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    n, k = ids.shape
    e = num_experts
    adjacent = np.zeros(e * e, dtype=np.int64)
    for j in range(k - 1):
        a, b = ids[:, j], ids[:, j + 1]
        adjacent += np.bincount(a * e + b, minlength=e * e) + np.bincount(b * e + a, minlength=e * e)
    adjacent = adjacent.reshape(e, e)
    cochosen = coactivation_matrix(ids, e)
    count = cochosen.diagonal().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(count[:, None] > 0, adjacent / count[:, None], 0.0)
        off = cochosen * (1 - np.eye(e, dtype=np.int64))
        baseline = np.where(count[:, None] > 0, off * (2.0 / k) / count[:, None], 0.0) if k > 1 else np.zeros((e, e))
        independent = np.zeros((e, e))
        if k > 1 and n > 0:
            inclusion = count / n
            pair = topk_pair_null(inclusion * (k / inclusion.sum()), k)
            safe = np.where(inclusion > 0, inclusion, 1.0)[:, None]
            independent = np.where(inclusion[:, None] > 0, pair * (2.0 / k) / safe, 0.0)
            np.fill_diagonal(independent, 0.0)
    return Coactivation(matrix, baseline, independent, cochosen)


def domain_specialisation(topk_ids: np.ndarray, doc_index: np.ndarray, doc_labels: Sequence[str | None],
                          num_experts: int, *, n_boot: int = 1000, n_perm: int = 200,
                          seed: int = 0) -> list[DomainSpecialisation]:
    """OLMoE's domain specialisation of one layer: per label, the share of its tokens routed to each expert.

    Parameters
    ----------
    topk_ids : np.ndarray
        int [n, k].
    doc_index : np.ndarray
        int [n], each token's document in [0, G).
    doc_labels : sequence of str or None
        [G] label of each document (None: unlabelled, left out).
    num_experts : int
    n_boot : int
        Bootstrap replicates over each domain's documents.
    n_perm : int
        Permutations of the labels among the labelled documents for ``max_specialisation_null``.

    Returns
    -------
    list of DomainSpecialisation
        Sorted by label; empty when fewer than two documents are labelled.
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    n, k = ids.shape
    g, e = len(doc_labels), num_experts
    doc_index = np.asarray(doc_index, dtype=np.int64)
    per_doc = np.bincount((doc_index[:, None] * e + ids).ravel(), minlength=g * e).reshape(g, e).astype(np.float64)
    tokens = np.bincount(doc_index, minlength=g).astype(np.float64)
    labelled = np.array([lab is not None for lab in doc_labels]) & (tokens > 0)
    if labelled.sum() < 2:
        return []
    names = sorted({str(doc_labels[i]) for i in np.flatnonzero(labelled)})
    label_of = np.array([names.index(str(doc_labels[i])) for i in np.flatnonzero(labelled)])
    counts, tok = per_doc[labelled], tokens[labelled]
    layer_share = counts.sum(0) / tok.sum()
    uniform = k / e
    rng = np.random.default_rng(seed)

    def max_shares(labels: np.ndarray) -> np.ndarray:
        onehot = np.zeros((len(names), len(labels)))
        onehot[labels, np.arange(len(labels))] = 1.0
        return ((onehot @ counts) / np.maximum(onehot @ tok, 1e-300)[:, None]).max(1)

    observed_max = max_shares(label_of)
    null_max = np.array([max_shares(rng.permutation(label_of)) for _ in range(n_perm)]).reshape(n_perm, len(names))
    out = []
    for d, name in enumerate(names):
        rows = label_of == d
        share = counts[rows].sum(0) / tok[rows].sum()
        m = int(rows.sum())
        if m >= 2:
            reps = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot).astype(np.float64)
            low, high = bootstrap_ratio_columns(reps, counts[rows], tok[rows])
        else:
            low, high = share, share
        lift = np.divide(share, layer_share, out=np.zeros(e), where=layer_share > 0)
        p = (1 + np.sum(null_max[:, d] >= observed_max[d] - 1e-12)) / (1 + n_perm) if n_perm else float("nan")
        out.append(DomainSpecialisation(name, int(tok[rows].sum()), m, share, low, high, share / uniform, lift,
                                        float(share.max() / uniform),
                                        float(null_max[:, d].mean() / uniform) if n_perm else float("nan"), float(p)))
    return out


def router_saturation(ids_a: np.ndarray, ids_b: np.ndarray, num_experts: int, boot: DocumentBootstrap,
                      chunk: int = 1 << 16) -> Saturation:
    """OLMoE's router saturation of one layer between two routings of the same tokens.

    Parameters
    ----------
    ids_a, ids_b : np.ndarray
        int [n, k_a], int [n, k_b], top-k experts of the same tokens (slot 0 the primary).
    num_experts : int
    boot : DocumentBootstrap
        Documents of the tokens.

    Returns
    -------
    Saturation
        Overlap divided by min(k_a, k_b).
    """
    a, b = np.asarray(ids_a), np.asarray(ids_b)
    if len(a) != len(b):
        raise ValueError(f"saturation needs the same tokens: {len(a)} vs {len(b)}")
    n, k = len(a), min(a.shape[1], b.shape[1])
    overlap = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk):
        x, y = a[start:start + chunk], b[start:start + chunk]
        overlap[start:start + chunk] = (x[:, :, None] == y[:, None, :]).any(2).sum(1) / k
    same_primary = (a[:, 0] == b[:, 0]).astype(np.float64)
    f_a = np.bincount(a.ravel(), minlength=num_experts) / max(n, 1)
    f_b = np.bincount(b.ravel(), minlength=num_experts) / max(n, 1)
    p_a = np.bincount(a[:, 0], minlength=num_experts) / max(n, 1)
    p_b = np.bincount(b[:, 0], minlength=num_experts) / max(n, 1)
    return Saturation(boot.mean(overlap), boot.mean(same_primary), float(f_a @ f_b / k), float(p_a @ p_b))


def check_same_tokens(trace, other) -> None:
    """Raise ValueError unless two traces hold the same tokens in the same order (and the same experts)."""
    if trace.num_tokens != other.num_tokens:
        raise ValueError(f"--compare-trace {other.path} holds {other.num_tokens} tokens, the trace {trace.num_tokens}: "
                         "saturation compares two routings of the same tokens")
    if trace.num_experts != other.num_experts:
        raise ValueError(f"--compare-trace {other.path} has {other.num_experts} experts, the trace {trace.num_experts}")
    a, b = trace.token_ids, other.token_ids
    if not np.array_equal(a, b):
        first = int(np.flatnonzero(a != b)[0])
        raise ValueError(f"--compare-trace {other.path} does not hold the same tokens (first difference at token "
                         f"{first}: id {int(a[first])} vs {int(b[first])})")
    if not np.array_equal(trace.doc_ids, other.doc_ids):
        raise ValueError(f"--compare-trace {other.path} splits the tokens into other documents")


def layer_metrics(topk_ids: np.ndarray, token_ids: np.ndarray, num_experts: int, *, layer: int = 0,
                  doc_ids: np.ndarray | None = None, doc_labels: Mapping[int, str] | None = None,
                  compare_ids: np.ndarray | None = None, min_count: int = DEFAULT_MIN_COUNT,
                  n_perm: int = DEFAULT_PERMUTATIONS, n_boot: int = 1000, seed: int = 0, overlap: bool = True,
                  boot: DocumentBootstrap | None = None) -> LayerMetrics:
    """Every router metric of one layer, from arrays.

    Parameters
    ----------
    topk_ids : np.ndarray
        int [n, k], experts sorted by weight (slot 0 the primary).
    token_ids : np.ndarray
        int [n].
    num_experts : int
    layer : int
        Recorded in the result.
    doc_ids : np.ndarray, optional
        int [n], documents (bootstrap unit, domain labels' key); None: one document.
    doc_labels : mapping of int to str, optional
        Domain label per document id.
    compare_ids : np.ndarray, optional
        int [n, k'], another routing of the same tokens (router saturation).
    min_count : int
        Vocabulary specialisation: token ids with fewer occurrences are left out.
    n_perm, n_boot, seed : int
        Permutations for the baselines, bootstrap replicates, seed.
    overlap : bool
        Compute the token-overlap (Jaccard) matrix.

    Returns
    -------
    LayerMetrics
    """
    ids = np.asarray(topk_ids)
    n, k = ids.shape
    doc_ids = np.zeros(n, dtype=np.int64) if doc_ids is None else np.asarray(doc_ids)
    if boot is None:
        boot = DocumentBootstrap(*document_index(doc_ids, n), n_boot=n_boot, seed=seed)
    domains = []
    if doc_labels:
        unique_docs = np.unique(doc_ids)
        labels = [doc_labels.get(int(d)) for d in unique_docs]
        domains = domain_specialisation(ids, boot.doc_index, labels, num_experts, n_boot=n_boot, seed=seed)
    return LayerMetrics(
        int(layer), int(n), int(num_experts), int(k), selection_frequency(ids, num_experts, boot),
        vocabulary_specialisation(token_ids, ids[:, 0], num_experts, min_count=min_count, n_perm=n_perm, seed=seed,
                                  n_boot=n_boot),
        token_overlap(token_ids, ids, num_experts, n_perm=n_perm, seed=seed) if overlap else None,
        olmoe_coactivation(ids, num_experts), domains,
        None if compare_ids is None else router_saturation(ids, compare_ids, num_experts, boot))


def router_metrics(trace, layers: Sequence[int] | None = None, *, doc_labels: Mapping[int, str] | None = None,
                   compare=None, min_count: int = DEFAULT_MIN_COUNT, n_perm: int = DEFAULT_PERMUTATIONS,
                   n_boot: int = 1000, seed: int = 0, overlap: bool = True) -> RouterMetrics:
    """The OLMoE router metrics of every requested layer of a trace (logits not needed).

    Parameters
    ----------
    trace : lazarus_core.routing.Trace
    layers : sequence of int, optional
        Model layer indices (default every captured layer).
    doc_labels : mapping of int to str, optional
        Domain label per document id (``lazarus_labels.json`` of a trace).
    compare : lazarus_core.routing.Trace, optional
        A second routing of the same tokens (another checkpoint): router saturation at the layers both hold.
    min_count, n_perm, n_boot, seed, overlap
        See :func:`layer_metrics`.

    Returns
    -------
    RouterMetrics

    Raises
    ------
    ValueError
        A layer not in the trace, or a ``compare`` trace of other tokens or without the layer.
    """
    chosen = check_layers(trace, layers)
    if compare is not None:
        check_same_tokens(trace, compare)
        missing = [l for l in chosen if l not in compare.layers]
        if missing:
            raise ValueError(f"--compare-trace {compare.path} lacks layers {missing}; its layers are {compare.layers}")
    token_ids, doc_ids = trace.token_ids, trace.doc_ids
    boot = DocumentBootstrap(*document_index(doc_ids, trace.num_tokens), n_boot=n_boot, seed=seed)
    out = [layer_metrics(trace.layer(l).topk_ids, token_ids, trace.num_experts, layer=l, doc_ids=doc_ids,
                         doc_labels=doc_labels, compare_ids=None if compare is None else compare.layer(l).topk_ids,
                         min_count=min_count, n_perm=n_perm, n_boot=n_boot, seed=seed, overlap=overlap, boot=boot)
           for l in chosen]
    return RouterMetrics(trace.meta.get("family"), trace.num_tokens, int(min_count), out,
                         None if compare is None else str(compare.path))
