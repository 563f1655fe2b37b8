"""Change routing inside a running model (ablate, boost/suppress, force, top-k) with context managers that nest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from lazarus_core.routing.conventions import route
from lazarus_core.routing.locate import MoeLayer, MoeModelInfo, find_moe_layers

_REGISTRY_ATTR = "_lazarus_routing_interventions"


@dataclass
class RoutingEdit:
    """One routing change at some layers; several active edits on a router combine.

    Attributes
    ----------
    ablate : tuple of int
        Experts removed from selection (their logit becomes -inf before the family's scoring, so a
        softmax family renormalises over the experts that remain; then the family's own top-k
        normalisation applies, e.g. none for OLMoE).
    logit_delta : dict[int, float]
        Added to an expert's raw router logit (boost > 0, suppress < 0) before scoring.
    force : tuple of int
        Experts always selected; their weight follows the family's rule from their (real) score.
    top_k : int or None
        Experts per token instead of the model's k.
    """

    ablate: tuple[int, ...] = ()
    logit_delta: dict[int, float] = field(default_factory=dict)
    force: tuple[int, ...] = ()
    top_k: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class RoutingIntervention:
    """Context manager applying a :class:`RoutingEdit` to chosen MoE layers of a model.

    A forward hook on each router recomputes ``(top_k_weights, top_k_index)`` from the router's raw
    logits with the family's convention (:func:`lazarus_core.routing.conventions.route`) and the
    edit, so the experts module mixes with the edited routing. Works in ``model(...)`` and
    ``model.generate(...)``; interventions nest (ablations and forced experts add up, logit deltas
    sum, the innermost ``top_k`` wins). The model is unchanged after exit.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE model.
    edit : RoutingEdit
    layers : sequence of int, optional
        Model layer indices (default every MoE layer); unknown ones raise ValueError.
    """

    def __init__(self, model: nn.Module, edit: RoutingEdit, layers: Sequence[int] | None = None,
                 *, info: MoeModelInfo | None = None) -> None:
        self.info = info or find_moe_layers(model)
        self.layers = self.info.select(list(layers) if layers is not None else None)
        self.edit = edit
        for layer in self.layers.values():
            _check_edit(edit, layer)

    def __enter__(self) -> "RoutingIntervention":
        for layer in self.layers.values():
            registry = getattr(layer.router, _REGISTRY_ATTR, None)
            if registry is None:
                registry = {"edits": [], "handle": None}
                setattr(layer.router, _REGISTRY_ATTR, registry)
            registry["edits"].append(self.edit)
            if registry["handle"] is None:
                registry["handle"] = layer.router.register_forward_hook(_make_hook(layer, self.info))
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers.values():
            registry = getattr(layer.router, _REGISTRY_ATTR)
            registry["edits"].remove(self.edit)
            if not registry["edits"]:
                registry["handle"].remove()
                delattr(layer.router, _REGISTRY_ATTR)


def _check_edit(edit: RoutingEdit, layer: MoeLayer) -> None:
    for e in (*edit.ablate, *edit.force, *edit.logit_delta):
        if not 0 <= int(e) < layer.num_experts:
            raise ValueError(f"expert {e} is out of range: layer {layer.layer} has {layer.num_experts} experts")
    if edit.top_k is not None and not 1 <= edit.top_k <= layer.num_experts:
        raise ValueError(f"top_k={edit.top_k} must be between 1 and {layer.num_experts} (layer {layer.layer})")


def _make_hook(layer: MoeLayer, info: MoeModelInfo):
    def hook(module, args, output):
        edits: list[RoutingEdit] = getattr(module, _REGISTRY_ATTR)["edits"]
        logits, weights, ids = output[0], output[1], output[2]
        delta = None
        if any(e.logit_delta for e in edits):
            delta = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
            for e in edits:
                for expert, value in e.logit_delta.items():
                    delta[int(expert)] += float(value)
        top_k = next((e.top_k for e in reversed(edits) if e.top_k is not None), layer.top_k)
        new_weights, new_ids = route(
            logits.reshape(-1, logits.shape[-1]), info.rule, top_k, correction_bias=layer.correction_bias,
            logit_delta=delta, exclude=[x for e in edits for x in e.ablate], force=[x for e in edits for x in e.force],
        )
        return (logits, new_weights.to(weights.dtype), new_ids.to(ids.dtype), *output[3:])

    return hook


def ablate_experts(model: nn.Module, experts: Sequence[int], layers: Sequence[int] | None = None) -> RoutingIntervention:
    """Remove ``experts`` from selection at ``layers`` (default all MoE layers); see :class:`RoutingEdit`."""
    return RoutingIntervention(model, RoutingEdit(ablate=tuple(int(e) for e in experts)), layers)


def boost_expert(model: nn.Module, expert: int, delta: float, layers: Sequence[int] | None = None) -> RoutingIntervention:
    """Add ``delta`` to ``expert``'s raw router logit at ``layers`` (negative ``delta`` suppresses)."""
    return RoutingIntervention(model, RoutingEdit(logit_delta={int(expert): float(delta)}), layers)


def suppress_expert(model: nn.Module, expert: int, delta: float, layers: Sequence[int] | None = None) -> RoutingIntervention:
    """Subtract ``delta`` (> 0) from ``expert``'s raw router logit at ``layers``."""
    return boost_expert(model, expert, -abs(float(delta)), layers)


def force_experts(model: nn.Module, experts: Sequence[int], layers: Sequence[int] | None = None) -> RoutingIntervention:
    """Always select ``experts`` at ``layers``; the remaining slots go to the best other experts."""
    return RoutingIntervention(model, RoutingEdit(force=tuple(int(e) for e in experts)), layers)


def set_top_k(model: nn.Module, top_k: int, layers: Sequence[int] | None = None) -> RoutingIntervention:
    """Route every token to ``top_k`` experts at ``layers``, with the family's own weighting rule."""
    return RoutingIntervention(model, RoutingEdit(top_k=int(top_k)), layers)
