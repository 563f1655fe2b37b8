"""Do positions that attend alike get the same experts? Attention weights next to routing, as arrays."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from lazarus_core.routing.locate import MoeModelInfo


def head_entropy_bits(weights: np.ndarray) -> np.ndarray:
    """Entropy (bits) of attention rows.

    Parameters
    ----------
    weights : np.ndarray
        float [..., n], each row a distribution.

    Returns
    -------
    np.ndarray
        float64 [...]; the baseline is log2 of the number of positions a row may attend to.
    """
    w = np.asarray(weights, dtype=np.float64)
    logs = np.log2(np.where(w > 0, w, 1.0))
    return -(w * logs).sum(-1)


def attention_and_routing(model, ids: Sequence[int], layers: Sequence[int], *, info: MoeModelInfo | None = None
                          ) -> tuple[dict[int, np.ndarray], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Run one sequence with eager attention and record each layer's attention weights and routing.

    The attention of layer L is the self-attention block of decoder layer L (it feeds the MoE of L).

    Parameters
    ----------
    model : nn.Module
        A transformers MoE causal LM loaded with eager attention (``attn_implementation="eager"``).
    ids : sequence of int
        Token ids [n] of one sequence.
    layers : sequence of int
        MoE layers (model layer indices).
    info : MoeModelInfo, optional
        The model's MoE layout (found when not given).

    Returns
    -------
    attention : dict[int, np.ndarray]
        Layer -> float32 [H, n, n] attention weights (row i: where position i looks).
    routing : dict[int, (np.ndarray int64 [n, k], np.ndarray float32 [n, k])]
        Layer -> experts sorted by weight and their weights.

    Raises
    ------
    ValueError
        The model has no decoder layers / self-attention (``.layers[L].self_attn``, or DBRX's
        ``.blocks[L].norm_attn_norm.attn``) or returned no attention weights.
    """
    import torch

    from lazarus_core.routing.capture import decoder_of
    from lazarus_core.routing.locate import attention_module, decoder_blocks
    from lazarus_core.routing.recorder import RoutingRecorder

    decoder = decoder_of(model)
    blocks = decoder_blocks(decoder)
    attn: dict[int, np.ndarray] = {}
    handles = []
    for l in layers:
        module = attention_module(blocks[l])
        if module is None:
            raise ValueError(f"layer {l} has no self-attention module (self_attn, or DBRX's norm_attn_norm.attn)")

        def hook(mod, args, output, l=l):
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                attn[l] = output[1][0].float().cpu().numpy()

        handles.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        with RoutingRecorder(model, list(layers), info=info) as rec, torch.inference_mode():
            decoder(input_ids=torch.tensor([ids], device=device), use_cache=False, output_attentions=True)
            routed = rec.pop()
    finally:
        for h in handles:
            h.remove()
    missing = [l for l in layers if l not in attn]
    if missing:
        raise ValueError(f"the model returned no attention weights at layers {missing} (eager attention unavailable)")
    return attn, {l: (r.topk_ids.numpy(), r.topk_weights.numpy()) for l, r in routed.items()}


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``x`` (float [n]) with ties given their average rank (float64 [n]): Spearman's input."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    # average ranks over ties
    vals, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a constant input.

    Parameters
    ----------
    a, b : np.ndarray
        float [n] each.
    """
    if len(a) < 3:
        return float("nan")
    ra, rb = average_ranks(np.asarray(a, float)), average_ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class AttentionRoutingLayer:
    """At one layer: do positions that attend alike get the same experts?

    Attributes
    ----------
    spearman : float
        Rank correlation, over position pairs, between the cosine similarity of their (head-mean)
        attention rows and the Jaccard overlap of their top-k expert sets.
    pairs : int
    same_expert_when_similar, same_expert_when_dissimilar : float
        Mean Jaccard of the pairs in the top and bottom quartile of attention similarity.
    """

    layer: int
    pairs: int
    spearman: float
    same_expert_when_similar: float
    same_expert_when_dissimilar: float

    def to_dict(self) -> dict:
        return asdict(self)


def attention_routing_stats(attn_rows: list[np.ndarray], expert_sets: list[np.ndarray], layer: int) -> AttentionRoutingLayer:
    """Pool position pairs of several prompts: attention-row cosine vs expert-set Jaccard.

    The baseline of the Jaccard among similar-attention pairs is the Jaccard among the
    dissimilar-attention pairs of the same prompts (same loads, same tokens).

    Parameters
    ----------
    attn_rows : list of np.ndarray
        Per prompt, float [n, n] head-mean attention (row i: where position i looks).
    expert_sets : list of np.ndarray
        Per prompt, int [n, k] experts.
    layer : int
        The layer the rows belong to (recorded in the result).

    Returns
    -------
    AttentionRoutingLayer
        NaN statistics when no prompt has two positions.
    """
    sims, jacs = [], []
    for a, s in zip(attn_rows, expert_sets):
        n = len(a)
        if n < 2:
            continue
        norm = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        cos = norm @ norm.T
        iu = np.triu_indices(n, 1)
        sets = [set(r.tolist()) for r in s]
        sims.append(cos[iu])
        jacs.append(np.array([len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for i, j in zip(*iu)]))
    if not sims:
        return AttentionRoutingLayer(layer, 0, float("nan"), float("nan"), float("nan"))
    sim, jac = np.concatenate(sims), np.concatenate(jacs)
    lo, hi = np.quantile(sim, [0.25, 0.75])
    return AttentionRoutingLayer(layer, int(len(sim)), spearman(sim, jac),
                                 float(jac[sim >= hi].mean()), float(jac[sim <= lo].mean()))
