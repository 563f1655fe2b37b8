"""Run the experts of a transformers MoE layer one at a time: each expert's output before its routing weight."""

from __future__ import annotations

import torch
from torch import nn


def _single_expert(experts: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``experts.forward`` with one slot per row and weight 1: row t gets expert ``ids[t]``'s output.

    ``forward`` is called directly (not ``experts(...)``) so hooks on the module, such as a routing
    recorder's, do not see these extra calls.
    """
    ones = torch.ones(ids.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    # DBRX's experts return [T, 1, H] for a [T, H] input
    return experts.forward(hidden, ids.reshape(-1, 1).long(), ones).reshape(ids.shape[0], -1)


def selected_expert_outputs(experts: nn.Module, hidden: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Output of each token's selected experts, before weighting.

    Parameters
    ----------
    experts : nn.Module
        A transformers experts module, called as ``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])``
        (every supported family in transformers 5).
    hidden : torch.Tensor
        float [s, H], the experts' input rows.
    topk_ids : torch.Tensor
        int [s, k], the experts selected per row (any order; the output follows it).

    Returns
    -------
    torch.Tensor
        [s, k, H] in ``hidden``'s dtype: slot j of row t is expert ``topk_ids[t, j]`` applied to
        ``hidden[t]`` (expert biases included, routing weight and scaling factor not applied).
    """
    if hidden.ndim != 2 or topk_ids.ndim != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"hidden must be [s, H] and topk_ids [s, k], got {tuple(hidden.shape)} and {tuple(topk_ids.shape)}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, topk_ids.shape[1], hidden.shape[1])
    return torch.stack([_single_expert(experts, hidden, topk_ids[:, j]) for j in range(topk_ids.shape[1])], dim=1)


def each_expert_output(experts: nn.Module, hidden: torch.Tensor, num_experts: int | None = None) -> torch.Tensor:
    """Every expert of the layer applied to every row (what CKA between experts on the same inputs needs).

    Parameters
    ----------
    experts : nn.Module
        A transformers experts module (see :func:`selected_expert_outputs`).
    hidden : torch.Tensor
        float [s, H].
    num_experts : int, optional
        E (default: the module's ``num_experts`` attribute).

    Returns
    -------
    torch.Tensor
        [s, E, H] in ``hidden``'s dtype, expert outputs before any routing weight.
    """
    if num_experts is None:
        num_experts = getattr(experts, "num_experts", None)
        if num_experts is None:
            raise ValueError("each_expert_output: the experts module has no num_experts; pass num_experts")
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [s, H], got {tuple(hidden.shape)}")
    s = hidden.shape[0]
    if s == 0:
        return hidden.new_zeros(0, num_experts, hidden.shape[1])
    return torch.stack([_single_expert(experts, hidden, torch.full((s,), e, device=hidden.device))
                        for e in range(num_experts)], dim=1)
