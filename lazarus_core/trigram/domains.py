"""Are experts domain specialists? Chi-square and Cramer's V on expert x domain tables, with a document-level permutation test."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lazarus_core.trigram.stats import chi2_sf


@dataclass
class ExpertDomains:
    """How one expert's tokens split over the domains (counts and share of each domain's tokens)."""

    expert: int
    total: int
    counts: dict[str, int]
    top_domain: str
    top_domain_share: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DomainTest:
    """Expert x domain contingency analysis of one layer.

    Attributes
    ----------
    chi2 : float
        Pearson chi-square of the table (rows: experts with any token; columns: domains).
    dof : int
    p_value : float
        Asymptotic chi-square p-value (tokens treated as independent: optimistic, tokens of one
        document are correlated).
    permutation_p_value : float or None
        Domain labels shuffled across documents (the honest test), when permutations > 0.
    cramers_v : float
        Effect size in [0, 1]: 0 = experts are used alike in every domain, 1 = each expert serves one domain.
        The plug-in estimate, biased upwards in finite samples (random routing gives V > 0).
    cramers_v_corrected : float
        Bergsma's (2013) bias-corrected V: the effect size to read; ``strength`` is worded from it.
    strength : str
        ``weak`` (< 0.1), ``moderate`` (< 0.3) or ``strong``, from ``cramers_v_corrected``.
    permutation_p_at_floor : bool
        The permutation p is ``1 / (permutations + 1)``, the smallest it can be: write it "< 1/(N+1)".
    """

    layer: int
    slots: str
    domains: list[str]
    num_tokens: int
    chi2: float
    dof: int
    p_value: float
    cramers_v: float
    permutation_p_value: float | None
    permutations: int
    experts: list[ExpertDomains] = field(default_factory=list)
    cramers_v_corrected: float = float("nan")
    strength: str = ""
    permutation_p_at_floor: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["experts"] = [e.to_dict() for e in self.experts]
        return d


def chi_square(table: np.ndarray) -> tuple[float, int, float, float]:
    """Pearson chi-square test of independence on a contingency table.

    Parameters
    ----------
    table : np.ndarray
        [R, C] non-negative counts; all-zero rows and columns are dropped.

    Returns
    -------
    (chi2, dof, p_value, cramers_v)
    """
    t = np.asarray(table, dtype=np.float64)
    t = t[t.sum(1) > 0][:, t.sum(0) > 0]
    n = t.sum()
    r, c = t.shape
    if n == 0 or r < 2 or c < 2:
        return 0.0, 0, 1.0, 0.0
    expected = t.sum(1, keepdims=True) * t.sum(0, keepdims=True) / n
    chi2 = float(((t - expected) ** 2 / expected).sum())
    dof = (r - 1) * (c - 1)
    v = float(np.sqrt(chi2 / (n * (min(r, c) - 1))))
    return chi2, dof, float(chi2_sf(chi2, dof)), v


def cramers_v_corrected(chi2: float, n: float, rows: int, cols: int) -> float:
    """Bergsma's bias-corrected Cramér's V of an [rows, cols] table with chi-square ``chi2`` over ``n`` counts.

    ``phi2 = max(0, chi2 / n - (rows - 1)(cols - 1) / (n - 1))``, ``r~ = rows - (rows - 1)^2 / (n - 1)``,
    ``c~ = cols - (cols - 1)^2 / (n - 1)``, ``V~ = sqrt(phi2 / min(r~ - 1, c~ - 1))`` (0 when undefined).
    """
    if n <= 1 or rows < 2 or cols < 2:
        return 0.0
    phi2 = max(0.0, chi2 / n - (rows - 1) * (cols - 1) / (n - 1))
    r = rows - (rows - 1) ** 2 / (n - 1)
    c = cols - (cols - 1) ** 2 / (n - 1)
    denom = min(r - 1, c - 1)
    return float(np.sqrt(phi2 / denom)) if denom > 0 else 0.0


def effect_strength(v: float) -> str:
    """``weak`` (< 0.1), ``moderate`` (< 0.3) or ``strong``: the words used for a (bias-corrected) V."""
    return "weak" if v < 0.1 else "moderate" if v < 0.3 else "strong"


def domain_test(topk_ids: np.ndarray, doc_ids: np.ndarray, doc_domains: dict[int, str], num_experts: int, *,
                layer: int, slots: str = "primary", permutations: int = 1000, seed: int = 0) -> DomainTest:
    """Test whether expert choice at one layer depends on the document's domain.

    Parameters
    ----------
    topk_ids : np.ndarray
        int [N, k] experts per token (sorted by weight).
    doc_ids : np.ndarray
        int [N] document of each token.
    doc_domains : dict[int, str]
        Document id -> domain label (documents without a label are left out).
    num_experts : int
    layer : int
    slots : {'primary', 'all'}
        Count the primary expert only (one observation per token: the chi-square assumption), or every slot.
    permutations : int
        Document-level label shuffles for the permutation p-value (0 = skip).
    seed : int

    Returns
    -------
    DomainTest

    Raises
    ------
    ValueError
        Fewer than two domains, or unknown ``slots``.
    """
    if slots not in ("all", "primary"):
        raise ValueError(f"--slots must be 'all' or 'primary', got {slots!r}")
    domains = sorted(set(doc_domains.values()))
    if len(domains) < 2:
        raise ValueError(f"a domain test needs at least two domains, got {domains}")
    docs = np.array(sorted(doc_domains), dtype=np.int64)
    keep = np.isin(doc_ids, docs)
    ids = np.asarray(topk_ids)[keep]
    ids = ids[:, :1] if slots == "primary" else ids
    row = np.searchsorted(docs, np.asarray(doc_ids)[keep]).astype(np.int64)
    # doc x expert counts, then domain x expert by summing documents
    per_doc = np.bincount((row[:, None] * num_experts + ids).reshape(-1),
                          minlength=len(docs) * num_experts).reshape(len(docs), num_experts)
    labels = np.array([domains.index(doc_domains[int(d)]) for d in docs])

    def table(lab: np.ndarray) -> np.ndarray:
        onehot = np.zeros((len(domains), len(docs)))
        onehot[lab, np.arange(len(docs))] = 1.0
        return (onehot @ per_doc).T                              # [E, D]

    observed = table(labels)
    chi2, dof, p, v = chi_square(observed)
    perm_p = None
    if permutations > 0:
        rng = np.random.default_rng(seed)
        exceed = sum(chi_square(table(rng.permutation(labels)))[0] >= chi2 - 1e-9 for _ in range(permutations))
        perm_p = (1.0 + exceed) / (1.0 + permutations)
    experts = []
    col_tot = observed.sum(0)
    for e in np.argsort(-observed.sum(1), kind="stable"):
        total = int(observed[e].sum())
        if total == 0:
            continue
        share = observed[e] / np.maximum(col_tot, 1)
        experts.append(ExpertDomains(int(e), total, {d: int(c) for d, c in zip(domains, observed[e])},
                                     domains[int(np.argmax(share))], float(share.max())))
    t = observed[observed.sum(1) > 0][:, observed.sum(0) > 0]
    v_corr = cramers_v_corrected(chi2, float(t.sum()), *t.shape) if t.size else 0.0
    return DomainTest(layer=int(layer), slots=slots, domains=domains, num_tokens=int(keep.sum()), chi2=chi2, dof=dof,
                      p_value=p, cramers_v=v, permutation_p_value=perm_p, permutations=permutations, experts=experts,
                      cramers_v_corrected=v_corr, strength=effect_strength(v_corr),
                      permutation_p_at_floor=perm_p is not None and perm_p <= 1.0 / (permutations + 1) + 1e-15)
