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
    activation_rows : torch.Tensor or None
        int64 [s], the rows (of the T) the activations below were kept for (None: no activations).
    hidden : torch.Tensor or None
        [s, H], the router input (= the experts' input) at those rows, in the model's dtype.
    expert_outputs : torch.Tensor or None
        [s, k, H], each selected expert's output before weighting, slots in ``topk_ids`` order.
    all_expert_outputs : torch.Tensor or None
        [s, E, H], every expert's output on those rows.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    logits: torch.Tensor | None = None
    activation_rows: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    expert_outputs: torch.Tensor | None = None
    all_expert_outputs: torch.Tensor | None = None


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
    hidden_states, expert_outputs, all_experts : bool
        Also keep, at the rows of :attr:`activation_rows` (all rows when None), the experts' input,
        each selected expert's output before weighting, and every expert's output. Expert outputs
        are computed by extra calls of the experts module's ``forward`` (hooks do not see them),
        so the model's own output is unchanged.

    Examples
    --------
    >>> with RoutingRecorder(model, logits=True) as rec:
    ...     model(input_ids)
    ...     step = rec.pop()          # {layer: LayerRouting}
    """

    def __init__(self, model: nn.Module, layers: list[int] | None = None, *, logits: bool = False,
                 info: MoeModelInfo | None = None, hidden_states: bool = False, expert_outputs: bool = False,
                 all_experts: bool = False) -> None:
        self.info = info or find_moe_layers(model)
        self.layers: dict[int, MoeLayer] = self.info.select(layers)
        self.keep_logits = logits
        self.keep_hidden, self.keep_expert_outputs, self.keep_all_experts = hidden_states, expert_outputs, all_experts
        self.activation_rows: torch.Tensor | None = None
        """int64 rows of the next forward call's flattened [batch x sequence] at which activations are kept."""
        self._logits: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        self._routed: dict[int, list[tuple]] = {l: [] for l in self.layers}
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
            # (logits, weights, ids) tuples; DBRX's router linear returns the logits tensor itself
            store.append((output if isinstance(output, torch.Tensor) else output[0]).detach())

        return hook

    def _experts_hook(self, idx: int):
        store = self._routed[idx]

        def hook(module, args, kwargs):
            ids = _argument(args, kwargs, 1, _INDEX_NAMES)
            weights = _argument(args, kwargs, 2, _WEIGHT_NAMES)
            if ids is None or weights is None:
                raise RuntimeError(f"layer {idx}: experts module called without (top_k_index, top_k_weights)")
            ids, weights = ids.detach(), weights.detach()
            acts = self._activations(module, args, kwargs, ids, weights) if self._wants_activations else None
            store.append((ids, weights, acts))

        return hook

    @property
    def _wants_activations(self) -> bool:
        return self.keep_hidden or self.keep_expert_outputs or self.keep_all_experts

    def _activations(self, module, args, kwargs, ids, weights) -> tuple:
        from lazarus_core.routing.expert_outputs import each_expert_output, selected_expert_outputs

        hidden = _argument(args, kwargs, 0, ("hidden_states", "hidden"))
        hidden = hidden.detach().reshape(ids.shape[0], -1)
        rows = self.activation_rows
        rows = torch.arange(ids.shape[0], device=ids.device) if rows is None else rows.to(ids.device)
        h = hidden[rows]
        sorted_ids, _ = sort_by_weight(ids[rows], weights[rows])
        outs = selected_expert_outputs(module, h, sorted_ids) if self.keep_expert_outputs else None
        every = each_expert_output(module, h, self.info.num_experts) if self.keep_all_experts else None
        return rows, (h if self.keep_hidden else None), outs, every

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
            if routed[0][2] is not None:
                offsets = torch.cumsum(torch.tensor([0] + [r[0].shape[0] for r in routed[:-1]]), 0)
                acts = [r[2] for r in routed]
                out[idx].activation_rows = torch.cat([a[0].cpu() + int(o) for a, o in zip(acts, offsets)])
                for slot, name in ((1, "hidden"), (2, "expert_outputs"), (3, "all_expert_outputs")):
                    if acts[0][slot] is not None:
                        setattr(out[idx], name, torch.cat([a[slot] for a in acts]))
            routed.clear()
            self._logits[idx].clear()
        return out
