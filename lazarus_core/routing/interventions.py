"""Change routing inside a running model (ablate, boost/suppress, force, top-k) with context managers that nest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from lazarus_core.routing.conventions import route
from lazarus_core.routing.locate import MoeLayer, MoeModelInfo, find_moe_layers

_REGISTRY_ATTR = "_lazarus_routing_interventions"


@dataclass(frozen=True)
class WeightOverride:
    """Set (or add to) one expert's post-softmax mixing weight, after the family's routing rule has run.

    Unlike ``RoutingEdit.ablate`` (which removes the expert from the competition, so the next best
    expert takes its slot), an override keeps the selection and changes only the mixing weight:

    * the expert's weight becomes ``value`` (``add=True``: its current weight plus ``value``; an
      expert that was not selected counts as weight 0 and is added as one more slot, so the experts
      module receives k + 1 slots);
    * families whose k weights are normalised (``rule.renormalize`` or top-k-then-softmax: Mixtral,
      GPT-OSS, Qwen3, DeepSeek, DBRX) keep their total: the other selected experts share what is left,
      ``max(total - new, 0)``, in their old proportions (DBRX with ``moe_normalize_expert_weights`` p != 1
      keeps their p-norm: ``sum(others^p) = max(||w||_p^p - new^p, 0)``); families that do not renormalise (OLMoE, Qwen2-MoE with
      ``norm_topk_prob=False``) leave the other weights as they are. Ablation is ``value=0``.

    Attributes
    ----------
    expert : int
    value : float
    add : bool
    rows : tuple of int or None
        Rows of each router call (token index in the flattened batch x sequence) that the override
        applies to; None: every row. With one sequence and no KV cache a row is a position.
    """

    expert: int
    value: float
    add: bool = False
    rows: tuple[int, ...] | None = None


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
    weights : tuple of WeightOverride
        Changes of post-softmax mixing weights, applied in order after the selection (see
        :class:`WeightOverride`).
    """

    ablate: tuple[int, ...] = ()
    logit_delta: dict[int, float] = field(default_factory=dict)
    force: tuple[int, ...] = ()
    top_k: int | None = None
    weights: tuple[WeightOverride, ...] = ()

    def reroutes(self) -> bool:
        """True when the edit changes the selection (ablate, logit_delta, force or top_k)."""
        return bool(self.ablate or self.logit_delta or self.force or self.top_k is not None)

    def to_dict(self) -> dict:
        return asdict(self)


class RoutingIntervention:
    """Context manager applying a :class:`RoutingEdit` to chosen MoE layers of a model.

    A forward hook on each router recomputes ``(top_k_weights, top_k_index)`` from the router's raw
    logits with the family's convention (:func:`lazarus_core.routing.conventions.route`) and the
    edit, so the experts module mixes with the edited routing. Where the block routes (DBRX,
    :attr:`MoeLayer.routes_in_block`), the router hook keeps the logits and a forward pre-hook on the
    experts module replaces the ``top_k_index`` / ``top_k_weights`` it receives. Works in ``model(...)`` and
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
                registry = {"edits": [], "handles": []}
                setattr(layer.router, _REGISTRY_ATTR, registry)
            registry["edits"].append(self.edit)
            if not registry["handles"]:
                registry["handles"] = _install_hooks(layer, self.info, registry)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers.values():
            registry = getattr(layer.router, _REGISTRY_ATTR)
            registry["edits"].remove(self.edit)
            if not registry["edits"]:
                for handle in registry["handles"]:
                    handle.remove()
                delattr(layer.router, _REGISTRY_ATTR)


def _check_edit(edit: RoutingEdit, layer: MoeLayer) -> None:
    for e in (*edit.ablate, *edit.force, *edit.logit_delta, *(w.expert for w in edit.weights)):
        if not 0 <= int(e) < layer.num_experts:
            raise ValueError(f"expert {e} is out of range: layer {layer.layer} has {layer.num_experts} experts")
    if edit.top_k is not None and not 1 <= edit.top_k <= layer.num_experts:
        raise ValueError(f"top_k={edit.top_k} must be between 1 and {layer.num_experts} (layer {layer.layer})")


def _edited_routing(edits: list[RoutingEdit], logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    layer: MoeLayer, info: MoeModelInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's (weights, ids) under ``edits``, in the dtypes of the model's own ``weights`` / ``ids``."""
    overrides = [w for e in edits for w in e.weights]
    if not any(e.reroutes() for e in edits):
        # Only weight overrides: keep the router's own selection and weights bit for bit.
        new_weights, new_ids = weights.float(), ids.long()
    else:
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
    for o in overrides:
        new_weights, new_ids = override_weight(new_weights, new_ids, o, info.rule)
    return new_weights.to(weights.dtype), new_ids.to(ids.dtype)


def _install_hooks(layer: MoeLayer, info: MoeModelInfo, registry: dict) -> list:
    """Hooks applying ``registry["edits"]`` at one layer; returns their handles."""
    return rewrite_routing(layer, lambda logits, weights, ids: _edited_routing(registry["edits"], logits, weights,
                                                                               ids, layer, info))


def rewrite_routing(layer: MoeLayer, rewrite) -> list:
    """Hook ``rewrite`` into one MoE layer so that its experts mix with the routing it returns.

    Parameters
    ----------
    layer : MoeLayer
    rewrite : callable
        ``rewrite(logits [T, E], weights [T, k], ids [T, k]) -> (weights [T, k'], ids [T, k'])``: the raw router
        logits and the routing the model computed; returns the routing to use, in the dtypes of the given one.

    Returns
    -------
    list of torch.utils.hooks.RemovableHandle
        Remove them all to restore the layer. Families whose router returns ``(logits, weights, ids)`` get a
        forward hook on the router; DBRX (:attr:`MoeLayer.routes_in_block`) a hook keeping the router
        linear's logits and a forward pre-hook, first among the experts module's, replacing its
        ``top_k_index`` / ``top_k_weights`` arguments (so a recorder sees what the experts mix with).
    """
    if not layer.routes_in_block:
        def router_hook(module, args, output):
            weights, ids = rewrite(output[0], output[1], output[2])
            return (output[0], weights, ids, *output[3:])

        return [layer.router.register_forward_hook(router_hook)]

    kept: dict = {"logits": None}

    def keep_logits(module, args, output):
        kept["logits"] = output

    def experts_hook(module, args, kwargs):
        logits, kept["logits"] = kept["logits"], None
        if logits is None:
            raise RuntimeError(f"layer {layer.layer}: the experts module ran without its router")
        args, kwargs = list(args), dict(kwargs)
        given = {}
        for position, name in ((1, "top_k_index"), (2, "top_k_weights")):
            if len(args) <= position and name not in kwargs:
                raise RuntimeError(f"layer {layer.layer}: experts module called without {name}")
            given[name] = args[position] if len(args) > position else kwargs[name]
        weights, ids = rewrite(logits, given["top_k_weights"], given["top_k_index"])
        for position, name, value in ((1, "top_k_index", ids), (2, "top_k_weights", weights)):
            if len(args) > position:
                args[position] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    return [layer.router.register_forward_hook(keep_logits),
            layer.experts.register_forward_pre_hook(experts_hook, with_kwargs=True, prepend=True)]


def renormalises(rule) -> bool:
    """True when the family's k mixing weights sum to a fixed total (normalised top-k or softmax over the k)."""
    return bool(rule.renormalize or rule.order == "topk_then_softmax")


def override_weight(weights: torch.Tensor, ids: torch.Tensor, override: WeightOverride,
                    rule) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one :class:`WeightOverride` to a router's top-k output (the rule is described there).

    Parameters
    ----------
    weights : torch.Tensor
        float [T, k] mixing weights.
    ids : torch.Tensor
        int [T, k] experts.
    override : WeightOverride
    rule : RoutingConvention
        The family's convention (decides whether the other weights keep the total).

    Returns
    -------
    (weights float32 [T, k'], ids int64 [T, k'])
        ``k' = k + 1`` when the expert gets a positive weight in a row where it was not selected; the
        extra slot of the other rows repeats their first expert with weight 0 (it adds exactly 0).
    """
    weights, ids = weights.float(), ids.long()
    n = weights.shape[0]
    target = torch.ones(n, dtype=torch.bool, device=weights.device)
    if override.rows is not None:
        target = torch.zeros_like(target)
        rows = torch.as_tensor([r for r in override.rows if 0 <= r < n], dtype=torch.long, device=weights.device)
        target[rows] = True
    selected = ids == int(override.expert)
    old = (weights * selected).sum(-1)
    new = old + float(override.value) if override.add else torch.full_like(old, float(override.value))
    new = torch.where(target, new.clamp_min(0.0), old)
    missing = target & ~selected.any(-1) & (new > 0)
    if missing.any():
        ids = torch.cat([ids, torch.where(missing, int(override.expert), ids[:, 0]).unsqueeze(1)], 1)
        weights = torch.cat([weights, torch.zeros(n, 1, dtype=weights.dtype, device=weights.device)], 1)
        selected = ids == int(override.expert)
        selected[~missing, -1] = False
    first = selected & (selected.cumsum(-1) == 1)            # one slot carries the expert's weight
    if renormalises(rule):
        # keep ||w||_p (p = 1: the total): the others scale by s with s^p * sum(others^p) = ||w||_p^p - new^p
        p = float(getattr(rule, "renormalize_p", 1.0)) if rule.renormalize else 1.0
        if p == 1.0:
            total = weights.sum(-1)
            others, left = total - old, (total - new).clamp_min(0.0)
        else:
            powered = weights.pow(p)
            others, left = (powered * ~selected).sum(-1), (powered.sum(-1) - new.pow(p)).clamp_min(0.0)
        scale = torch.where(others > 0, left / torch.where(others > 0, others, 1.0), torch.ones_like(others))
        if p != 1.0:
            scale = scale.pow(1.0 / p)
        scale = torch.where(target, scale, torch.ones_like(scale))
        weights = torch.where(selected, weights, weights * scale.unsqueeze(1))
    weights = torch.where(first, new.unsqueeze(1), torch.where(selected, 0.0, weights))
    return weights, ids


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
