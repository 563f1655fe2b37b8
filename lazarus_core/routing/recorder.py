"""Forward hooks that record, per MoE layer, the raw router logits and what the experts module really received."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lazarus_core.routing.locate import MoeLayer, MoeModelInfo, find_moe_layers


_INDEX_NAMES = ("top_k_index", "router_indices", "topk_indices", "selected_experts")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "topk_weights", "router_scores")


def _argument(args: tuple, kwargs: dict, position: int, names: tuple[str, ...]):
    if len(args) > position:
        return args[position]
    return next((kwargs[n] for n in names if n in kwargs), None)


@dataclass
class LayerRouting:
    """Routing of one MoE layer for one forward call (all T = batch x sequence rows, padding included).

    Attributes
    ----------
    topk_ids : torch.Tensor
        int64 [T, k], experts sorted by weight, descending.
    topk_weights : torch.Tensor
        float32 [T, k], the weights the experts module received, same order.
    logits : torch.Tensor or None
        float32 [T, E], the router's raw output (before softmax/sigmoid; GPT-OSS: with its bias).
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    logits: torch.Tensor | None = None


def sort_by_weight(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's (expert, weight) pairs by weight, descending (stable).

    Parameters
    ----------
    ids : torch.Tensor
        int [T, k].
    weights : torch.Tensor
        float [T, k].

    Returns
    -------
    (ids int64 [T, k], weights float32 [T, k])
    """
    order = torch.argsort(weights.float(), dim=-1, descending=True, stable=True)
    return ids.long().gather(1, order), weights.float().gather(1, order)


class RoutingRecorder:
    """Context manager that records routing at chosen MoE layers on every forward call.

    Hooks: a forward hook on each router module keeps its first output (raw logits), and a forward
    pre-hook on each experts module keeps ``top_k_index`` and ``top_k_weights`` exactly as the experts
    received them (so interventions and family conventions are reflected). ``output_router_logits`` is
    never used. Each forward call appends one record per layer; :meth:`pop` returns and clears them.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE model.
    layers : list of int, optional
        Model layer indices to record (default: every MoE layer). Unknown indices raise ValueError.
    logits : bool
        Also keep the raw router logits.

    Examples
    --------
    >>> with RoutingRecorder(model, logits=True) as rec:
    ...     model(input_ids)
    ...     step = rec.pop()          # {layer: LayerRouting}
    """

    def __init__(self, model: nn.Module, layers: list[int] | None = None, *, logits: bool = False,
                 info: MoeModelInfo | None = None) -> None:
        self.info = info or find_moe_layers(model)
        self.layers: dict[int, MoeLayer] = self.info.select(layers)
        self.keep_logits = logits
        self._logits: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        self._routed: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {l: [] for l in self.layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "RoutingRecorder":
        for idx, layer in self.layers.items():
            if self.keep_logits:
                self._handles.append(layer.router.register_forward_hook(self._router_hook(idx)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._experts_hook(idx), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _router_hook(self, idx: int):
        store = self._logits[idx]

        def hook(module, args, output):
            store.append(output[0].detach())

        return hook

    def _experts_hook(self, idx: int):
        store = self._routed[idx]

        def hook(module, args, kwargs):
            ids = _argument(args, kwargs, 1, _INDEX_NAMES)
            weights = _argument(args, kwargs, 2, _WEIGHT_NAMES)
            if ids is None or weights is None:
                raise RuntimeError(f"layer {idx}: experts module called without (top_k_index, top_k_weights)")
            store.append((ids.detach(), weights.detach()))

        return hook

    def pop(self) -> dict[int, LayerRouting]:
        """Return the routing recorded since the last pop, concatenated over calls, and clear it.

        Returns
        -------
        dict[int, LayerRouting]
            Layer index -> routing of every row seen (rows of several calls are concatenated in order).
        """
        out: dict[int, LayerRouting] = {}
        for idx in self.layers:
            routed = self._routed[idx]
            if not routed:
                continue
            ids = torch.cat([r[0] for r in routed]) if len(routed) > 1 else routed[0][0]
            weights = torch.cat([r[1] for r in routed]) if len(routed) > 1 else routed[0][1]
            ids, weights = sort_by_weight(ids, weights)
            logits = None
            if self.keep_logits and self._logits[idx]:
                parts = self._logits[idx]
                logits = (torch.cat(parts) if len(parts) > 1 else parts[0]).float()
            out[idx] = LayerRouting(ids, weights, logits)
            routed.clear()
            self._logits[idx].clear()
        return out
