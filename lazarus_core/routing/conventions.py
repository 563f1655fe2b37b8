"""Each MoE family's routing rule as one readable function, so capture and interventions agree with the model."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from lazarus_core.models.families import RoutingConvention, detect_family


def convention_of(config) -> tuple[str, RoutingConvention]:
    """Return (family, routing convention) of a transformers config, from :mod:`lazarus_core.models.families`.

    Parameters
    ----------
    config : transformers.PretrainedConfig or Mapping
        The model's config (object or parsed ``config.json``).

    Raises
    ------
    lazarus_core.models.families.UnsupportedModelError
        Not a supported MoE family.
    """
    as_dict = config if isinstance(config, Mapping) else config.to_dict()
    spec = detect_family(as_dict)
    return spec.family, spec.routing


def route(
    logits: torch.Tensor,
    rule: RoutingConvention,
    top_k: int,
    *,
    correction_bias: torch.Tensor | None = None,
    logit_delta: torch.Tensor | None = None,
    exclude: Sequence[int] = (),
    force: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a family's routing rule (optionally modified) to raw router logits.

    The order is: add ``logit_delta`` to the raw logits; remove ``exclude`` experts from the
    competition (their logit is -inf, so a softmax renormalises over the experts that remain, as if
    they did not exist); select the top-k (groups first where the family uses them, ``force`` experts
    always win a slot); compute the weights of the selected experts with the family's own rule.

    Parameters
    ----------
    logits : torch.Tensor
        float [T, E], raw router output (before softmax/sigmoid; GPT-OSS: including the router bias).
    rule : RoutingConvention
        The family's convention (:func:`convention_of`).
    top_k : int
        Number of experts per token (1 <= top_k <= E).
    correction_bias : torch.Tensor, optional
        float [E], DeepSeek-V3 ``e_score_correction_bias`` (selection only).
    logit_delta : torch.Tensor, optional
        float [E], added to the raw logits of every token (boost > 0, suppress < 0).
    exclude : sequence of int
        Experts that may not be selected.
    force : sequence of int
        Experts that are always selected (at most ``top_k`` of them).

    Returns
    -------
    weights : torch.Tensor
        float32 [T, top_k], the mixing weights, sorted descending along the last axis.
    ids : torch.Tensor
        int64 [T, top_k], the expert of each weight.

    Raises
    ------
    ValueError
        ``top_k`` out of range, too many forced experts, an expert both forced and excluded, or
        fewer than ``top_k`` experts left after exclusion.
    """
    n_tokens, n_experts = logits.shape
    exclude, force = sorted(set(int(e) for e in exclude)), sorted(set(int(e) for e in force))
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({n_experts})")
    if len(force) > top_k:
        raise ValueError(f"cannot force {len(force)} experts with top_k={top_k}")
    if set(force) & set(exclude):
        raise ValueError(f"experts {sorted(set(force) & set(exclude))} are both forced and excluded")
    if n_experts - len(exclude) < top_k:
        raise ValueError(f"only {n_experts - len(exclude)} experts remain after exclusion, top_k={top_k}")
    for e in (*exclude, *force):
        if not 0 <= e < n_experts:
            raise ValueError(f"expert {e} is out of range (the router has {n_experts} experts)")

    x = logits.float()
    if logit_delta is not None:
        x = x + logit_delta.float()
    if exclude:
        x = x.clone()
        x[:, exclude] = float("-inf")
    scores = torch.softmax(x, dim=-1) if rule.scoring == "softmax" else torch.sigmoid(x)
    select_on_logits = rule.order == "topk_then_softmax"
    choice = (x if select_on_logits else scores).clone()
    if rule.selection_bias and correction_bias is not None:
        choice = choice + correction_bias.float()
    if exclude:
        choice[:, exclude] = float("-inf")
    if rule.n_group and rule.n_group > 1:
        choice = _limit_to_groups(choice, rule)
    if force:
        choice[:, force] = float("inf")
    ids = torch.topk(choice, top_k, dim=-1).indices
    if select_on_logits:
        weights = torch.softmax(x.gather(1, ids), dim=-1)
    else:
        weights = scores.gather(1, ids)
        if rule.renormalize and rule.renormalize_p != 1.0:  # DBRX moe_normalize_expert_weights
            weights = weights / torch.norm(weights, p=rule.renormalize_p, dim=-1, keepdim=True)
        elif rule.renormalize:
            eps = 1e-20 if rule.scoring == "sigmoid" else 0.0  # DeepSeek-V3 adds 1e-20 to the denominator
            weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    weights = weights * rule.routed_scaling_factor
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    return weights.gather(1, order), ids.gather(1, order)


def _limit_to_groups(choice: torch.Tensor, rule: RoutingConvention) -> torch.Tensor:
    """Keep only the experts of each token's ``topk_group`` best groups (others become -inf)."""
    n_tokens, n_experts = choice.shape
    grouped = choice.view(n_tokens, rule.n_group, n_experts // rule.n_group)
    if rule.group_score == "top2_sum":
        # Sum of the two best experts still in the running; an excluded expert (-inf) counts as absent,
        # so ablating one expert does not knock its whole group out.
        best2 = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values
        finite = torch.isfinite(best2)
        group_scores = torch.where(finite, best2, torch.zeros_like(best2)).sum(dim=-1)
        group_scores = group_scores.masked_fill(~finite.any(dim=-1), float("-inf"))
    else:
        group_scores = grouped.max(dim=-1).values
    best = torch.topk(group_scores, rule.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(n_tokens, n_experts)
    return choice.masked_fill(~keep, float("-inf"))
