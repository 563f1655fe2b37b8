"""Find the MoE layers of a loaded transformers model: each layer's router module and experts module.

Every family's router returns ``(logits, top_k_weights, top_k_index)`` except DBRX's: ``DbrxRouter`` returns
the logits only (its ``layer`` linear) and ``DbrxFFN.route_tokens_to_experts`` computes the top-k, so for
DBRX the router is the ``router.layer`` linear and :attr:`MoeLayer.routes_in_block` is True.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lazarus_core.models.families import RoutingConvention
from lazarus_core.routing.conventions import convention_of

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward|ffn)$")
_ROUTER_NAMES = ("gate", "router")


class NoMoeLayersError(ValueError):
    """The model has no module with a router and an experts child (a dense model)."""


@dataclass
class MoeLayer:
    """One MoE block of a model, addressed by the model's own layer index.

    Attributes
    ----------
    layer : int
        The decoder layer index (``model.layers[layer]``), not the count among MoE layers.
    block, router, experts : nn.Module
        The MoE block, its router (returns ``(logits, top_k_weights, top_k_index)``; DBRX: the
        ``router.layer`` linear, returning the logits ``[T, E]``) and its experts module (called as
        ``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])``; DBRX's hidden is ``[B, S, H]``).
    num_experts, top_k : int
        Routed experts E and experts per token k.
    routes_in_block : bool
        The router returns only logits and the block computes the top-k (DBRX): edits of the routing
        replace the experts module's ``top_k_index`` / ``top_k_weights`` arguments instead of the router's output.
    """

    layer: int
    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    routes_in_block: bool = False

    @property
    def correction_bias(self) -> torch.Tensor | None:
        """float [E] DeepSeek-V3 selection bias, or None."""
        return getattr(self.router, "e_score_correction_bias", None)


@dataclass
class MoeModelInfo:
    """The MoE layers of a model and its routing rule."""

    family: str
    rule: RoutingConvention
    layers: dict[int, MoeLayer]
    num_experts: int
    top_k: int

    def select(self, layers: list[int] | None) -> dict[int, MoeLayer]:
        """Return the requested MoE layers (all when None).

        Raises
        ------
        ValueError
            A requested index is not an MoE layer of this model; the message lists the valid ones.
        """
        if layers is None:
            return dict(self.layers)
        missing = [l for l in layers if l not in self.layers]
        if missing:
            raise ValueError(f"layer(s) {missing} are not MoE layers of this {self.family} model; "
                             f"MoE layers are {sorted(self.layers)}")
        return {l: self.layers[l] for l in sorted(set(layers))}


def decoder_blocks(decoder: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers decoder stack: ``.layers``, or DBRX's ``.blocks``.

    Raises
    ------
    ValueError
        The module has neither (not a transformers causal LM's decoder).
    """
    for name in ("layers", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"{type(decoder).__name__} has no decoder .layers or .blocks (a transformers causal LM)")


def attention_module(block: nn.Module) -> nn.Module | None:
    """The self-attention of one decoder layer: ``self_attn``, or DBRX's ``norm_attn_norm.attn`` (its block fuses
    the attention with the norms around it); None when the layer has neither. Both return ``(output, weights)``."""
    attn = getattr(block, "self_attn", None)
    if attn is None:
        attn = getattr(getattr(block, "norm_attn_norm", None), "attn", None)
    return attn


def find_moe_layers(model: nn.Module) -> MoeModelInfo:
    """Locate every MoE block of a transformers causal LM and the family's routing rule.

    Parameters
    ----------
    model : nn.Module
        A transformers model (``*ForCausalLM`` or the bare decoder) of a supported MoE family.

    Raises
    ------
    NoMoeLayersError
        No decoder layer carries a router and an experts module.
    ValueError
        The family's routing rule is unknown.
    """
    layers: dict[int, MoeLayer] = {}
    for name, module in model.named_modules():
        match = _LAYER_RE.search(name)
        if not match or not hasattr(module, "experts"):
            continue
        router = next((getattr(module, n) for n in _ROUTER_NAMES if isinstance(getattr(module, n, None), nn.Module)),
                      None)
        in_block = router is not None and not hasattr(router, "weight") and isinstance(getattr(router, "layer", None),
                                                                                       nn.Linear)
        if in_block:  # DBRX: DbrxRouter.layer gives the logits, DbrxFFN (top_k) the routing
            router = router.layer
        if router is None or not hasattr(router, "weight"):
            continue
        idx = int(match.group(1))
        top_k = module.top_k if in_block else router.top_k
        layers[idx] = MoeLayer(layer=idx, name=name, block=module, router=router, experts=module.experts,
                               num_experts=int(router.weight.shape[0]), top_k=int(top_k), routes_in_block=in_block)
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or type(model).__name__
    if not layers:
        raise NoMoeLayersError(f"the {family} model has no MoE layers (no decoder layer has a router and experts); "
                               "routing capture needs a Mixture-of-Experts model")
    family, rule = convention_of(config)
    first = layers[min(layers)]
    return MoeModelInfo(family=family, rule=rule, layers=dict(sorted(layers.items())),
                        num_experts=first.num_experts, top_k=first.top_k)
