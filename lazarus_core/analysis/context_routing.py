"""How one token's experts depend on its context: its routing across contexts, and how much left context it needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lazarus_core.routing.locate import MoeModelInfo
from lazarus_core.trigram.context import LayerContextDependence, Occurrence, context_dependence, find_occurrences

DEFAULT_WINDOWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def default_contexts(token: str) -> list[str]:
    """Contexts for ``token`` of every kind (alone, after a number, after an operator, in a sentence, in code)."""
    return [token, f"111 {token}", f"= {token}", f"The value is {token}.", f"{token} + 5 = 9",
            f"x = {token}", f"I saw {token} birds in the park.", f"if count > {token}:\n    return {token}",
            f"Is {token} bigger than ten?", f"{token}, {token} and more"]


def check_token(tokenizer, token: str) -> None:
    """Raise a ValueError naming ``--token`` when ``token`` is empty or encodes to the unknown token."""
    if not token or not token.strip():
        raise ValueError("--token is empty")
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise ValueError(f"--token {token!r} is not in the tokenizer's vocabulary (it encodes to the unknown token)")


def token_occurrences(trace, decoder, classifier, token: str, view: str = "semantic",
                      contexts: Sequence[str] | None = None) -> list[Occurrence]:
    """Every occurrence of ``token`` in ``trace`` (documents = ``contexts`` when they were captured from them).

    Raises
    ------
    ValueError
        The token does not occur (in some given context, or anywhere); the message names ``--token``.
    """
    occ = find_occurrences(trace, decoder, classifier, token, view)
    if contexts:
        missing = sorted(set(range(len(contexts))) - {o.doc for o in occ})
        if missing:
            raise ValueError(f"--token {token!r} does not occur in context(s) " + ", ".join(repr(contexts[i]) for i in missing))
    if not occ:
        raise ValueError(f"--token {token!r} does not occur in the trace {trace.path}")
    return occ


@dataclass
class TokenRouting:
    """One token's experts in every context it occurs in, and its context dependence at each layer.

    Attributes
    ----------
    token : str
    layer : int
        The layer whose experts ``experts`` / ``weights`` hold.
    occurrences : list of Occurrence
    experts : np.ndarray
        int32 [n_occurrences, k] at ``layer``.
    weights : np.ndarray
        float32 [n_occurrences, k] at ``layer``.
    layers : list of LayerContextDependence
        Per analysed layer: distinct primary experts and top-k agreement, next to the agreement of random
        token pairs (the baseline).
    """

    token: str
    layer: int
    occurrences: list[Occurrence]
    experts: np.ndarray
    weights: np.ndarray
    layers: list[LayerContextDependence] = field(default_factory=list)

    def layer_result(self, layer: int) -> LayerContextDependence:
        return next(d for d in self.layers if d.layer == layer)

    def to_dict(self) -> dict:
        return {"token": self.token, "layer": self.layer,
                "occurrences": [dict(o.to_dict(), experts=e.tolist(), weights=w.tolist())
                                for o, e, w in zip(self.occurrences, self.experts, self.weights)],
                "layers": [d.to_dict() for d in self.layers]}


def token_routing(trace, occurrences: list[Occurrence], token: str, layer: int, *, layers: Sequence[int] | None = None,
                  seed: int = 0) -> TokenRouting:
    """The experts ``token`` gets at each of its ``occurrences``, and its context dependence per layer.

    Parameters
    ----------
    trace : Trace
    occurrences : list of Occurrence
        From :func:`token_occurrences`.
    token : str
    layer : int
        Layer of the per-occurrence experts.
    layers : sequence of int, optional
        Layers of the context-dependence summary (default every layer of the trace).
    seed : int
        Seed of the random-pair baseline.

    Returns
    -------
    TokenRouting
    """
    rows = np.array([o.row for o in occurrences], dtype=np.int64)
    lt = trace.layer(layer)
    tris = [o.trigram for o in occurrences]
    per_layer = [context_dependence(trace.layer(l).topk_ids, rows.tolist(), tris, trace.num_experts, layer=l, seed=seed)
                 for l in (trace.layers if layers is None else layers)]
    return TokenRouting(token, layer, occurrences, np.asarray(lt.topk_ids[rows]), np.asarray(lt.topk_weights[rows]),
                        per_layer)


@dataclass
class ContextTest:
    """Does the trigram context predict a token's expert better than the token alone? Per layer.

    Attributes
    ----------
    token : str
    occurrences : list of Occurrence
    layers : list of LayerContextDependence
        ``primary_by_trigram`` (leave-one-out accuracy of the trigram's modal expert) next to
        ``primary_by_token`` (the token's modal expert: the baseline), and agreement vs random pairs.
    """

    token: str
    occurrences: list[Occurrence]
    layers: list[LayerContextDependence]

    def trigram_counts(self) -> dict[str, int]:
        """Occurrences per trigram context, most frequent first."""
        tris = [o.trigram for o in self.occurrences]
        counts = {t: tris.count(t) for t in dict.fromkeys(tris)}
        return dict(sorted(counts.items(), key=lambda x: -x[1]))

    def to_dict(self) -> dict:
        return {"token": self.token, "occurrences": [o.to_dict() for o in self.occurrences],
                "layers": [d.to_dict() for d in self.layers]}


def context_test(trace, occurrences: list[Occurrence], token: str, layers: Sequence[int], *, seed: int = 0) -> ContextTest:
    """Context dependence of ``token`` at ``layers`` (see :class:`ContextTest`)."""
    rows, tris = [o.row for o in occurrences], [o.trigram for o in occurrences]
    return ContextTest(token, occurrences, [context_dependence(trace.layer(l).topk_ids, rows, tris, trace.num_experts,
                                                               layer=l, seed=seed) for l in layers])


@dataclass
class ContextWindowRow:
    """The routing of the target position with only ``window`` tokens of left context.

    Attributes
    ----------
    window : int
        Left-context tokens kept (0: the token alone).
    experts : dict[int, list of int]
        Layer -> top-k experts of the target position.
    jaccard : dict[int, float]
        Layer -> Jaccard overlap with the full-context top-k (1 = the same set).
    same_primary : dict[int, bool]
        Layer -> the primary (slot 0) expert equals the full-context one.
    """

    window: int
    experts: dict[int, list[int]]
    jaccard: dict[int, float]
    same_primary: dict[int, bool]

    def to_dict(self) -> dict:
        return {"window": self.window, "layers": {str(l): {"jaccard": self.jaccard[l], "same_primary": self.same_primary[l],
                                                           "experts": self.experts[l]} for l in self.experts}}


@dataclass
class ContextWindow:
    """How many preceding tokens a position needs before its experts match those of its full context.

    Attributes
    ----------
    position : int
    layers : list of int
    full_context_experts : dict[int, list of int]
        Layer -> top-k experts with the whole left context (the reference; window = position).
    windows : list of ContextWindowRow
        Ascending window sizes, the last one the full context (Jaccard 1 by construction).
    """

    position: int
    layers: list[int]
    full_context_experts: dict[int, list[int]]
    windows: list[ContextWindowRow]

    def needed(self, layer: int) -> int:
        """Smallest window from which every larger window keeps the full-context expert set at ``layer``."""
        need = self.position
        for row in reversed(self.windows):
            if row.jaccard[layer] < 1.0:
                break
            need = row.window
        return need

    def to_dict(self) -> dict:
        return {"position": self.position, "layers": self.layers,
                "full_context_experts": {str(l): e for l, e in self.full_context_experts.items()},
                "windows": [w.to_dict() for w in self.windows],
                "window_needed": {str(l): self.needed(l) for l in self.layers}}


def _route_last(model, ids: Sequence[int], layers: Sequence[int], info: MoeModelInfo | None) -> dict[int, np.ndarray]:
    import torch

    from lazarus_core.routing.capture import decoder_of
    from lazarus_core.routing.recorder import RoutingRecorder

    device = next(model.parameters()).device
    with RoutingRecorder(model, list(layers), info=info) as rec, torch.inference_mode():
        decoder_of(model)(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
        routed = rec.pop()
    return {l: r.topk_ids[-1].cpu().numpy().astype(np.int64) for l, r in routed.items()}


def context_window(model, ids: Sequence[int], position: int, layers: Sequence[int], *, info: MoeModelInfo | None = None,
                   windows: Sequence[int] = DEFAULT_WINDOWS) -> ContextWindow:
    """Route ``ids[position - w : position + 1]`` for growing ``w`` and compare with the full left context.

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM.
    ids : sequence of int
        Token ids [n] of the prompt.
    position : int
        Target position (0 <= position < n).
    layers : sequence of int
        MoE layers.
    info : MoeModelInfo, optional
    windows : sequence of int
        Window sizes to try (those below ``position``); 0 and ``position`` are always included.

    Returns
    -------
    ContextWindow

    Raises
    ------
    ValueError
        ``position`` outside the prompt (the message names ``--position``).
    """
    if not 0 <= position < len(ids):
        raise ValueError(f"--position {position} is out of range: the prompt has {len(ids)} tokens (0..{len(ids) - 1})")
    layers = list(layers)
    full = _route_last(model, ids[: position + 1], layers, info)
    sizes = sorted({0, *[w for w in windows if w < position], position})
    rows = []
    for w in sizes:
        part = full if w == position else _route_last(model, ids[position - w: position + 1], layers, info)
        jac, same = {}, {}
        for l in layers:
            a, b = set(full[l].tolist()), set(part[l].tolist())
            jac[l] = len(a & b) / len(a | b)
            same[l] = int(full[l][0]) == int(part[l][0])
        rows.append(ContextWindowRow(w, {l: part[l].tolist() for l in layers}, jac, same))
    return ContextWindow(position, layers, {l: full[l].tolist() for l in layers}, rows)
