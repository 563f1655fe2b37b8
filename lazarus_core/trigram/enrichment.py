"""Which experts a subset of tokens (a category, a trigram, a position) uses more than the layer does."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lazarus_core.trigram.stats import benjamini_hochberg, binom_sf


@dataclass
class ExpertEnrichment:
    """Expert ``expert`` gets ``count`` of the subset's ``subset_tokens`` tokens; the layer's rate predicts ``expected``."""

    expert: int
    count: int
    subset_tokens: int
    share: float
    layer_share: float
    lift: float
    p_value: float
    q_value: float

    def to_dict(self) -> dict:
        return asdict(self)


def expert_enrichment(topk_ids: np.ndarray, mask: np.ndarray, num_experts: int, *, slots: str = "all",
                      top: int | None = None) -> list[ExpertEnrichment]:
    """Experts over-used by the tokens in ``mask`` relative to all tokens of the layer.

    ``share`` is the fraction of subset tokens routed to the expert, ``layer_share`` the fraction of
    all tokens; the p-value is one-sided binomial ``P[Binomial(m, layer_share) >= count]`` for ``m``
    subset tokens; q-values are Benjamini-Hochberg over the experts.

    Parameters
    ----------
    topk_ids : np.ndarray
        int [N, k].
    mask : np.ndarray
        bool [N], the subset.
    num_experts : int
    slots : {'all', 'primary'}
    top : int, optional
        Keep the ``top`` experts by lift among those the subset uses (default all used).

    Returns
    -------
    list of ExpertEnrichment, strongest lift first.
    """
    ids = np.asarray(topk_ids)
    ids = ids[:, :1] if slots == "primary" else ids
    mask = np.asarray(mask, dtype=bool)
    n, m = len(ids), int(mask.sum())
    if m == 0:
        return []
    overall = np.bincount(ids.reshape(-1), minlength=num_experts) / max(n, 1)
    sub = np.bincount(ids[mask].reshape(-1), minlength=num_experts)
    p = binom_sf(sub, m, overall)
    q = benjamini_hochberg(p)
    share = sub / m
    lift = np.where(overall > 0, share / np.where(overall > 0, overall, 1), 0.0)
    order = [e for e in np.lexsort((-sub, -lift)) if sub[e] > 0]
    out = [ExpertEnrichment(int(e), int(sub[e]), m, float(share[e]), float(overall[e]), float(lift[e]), float(p[e]),
                            float(q[e])) for e in order]
    return out[:top] if top else out
