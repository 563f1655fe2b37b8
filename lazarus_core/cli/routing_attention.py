"""Actions `attention-routing` and `attention-pattern`: the model's eager attention weights next to the experts chosen."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import numpy as np

from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit, experts_str


def attention_and_routing(session: Session, ids: list[int], layers: list[int]):
    """Run one sequence with eager attention; return ({layer: attn float32 [H, n, n]}, {layer: (ids, weights)}).

    The attention of layer L is the self-attention block of decoder layer L (it feeds the MoE of L).
    """
    import torch

    from lazarus_core.routing.capture import decoder_of
    from lazarus_core.routing.recorder import RoutingRecorder

    model = session.model
    decoder = decoder_of(model)
    blocks = getattr(decoder, "layers", None)
    if blocks is None:
        raise ValueError("attention analyses need a decoder with .layers (a transformers causal LM)")
    attn: dict[int, np.ndarray] = {}
    handles = []
    for l in layers:
        module = getattr(blocks[l], "self_attn", None)
        if module is None:
            raise ValueError(f"layer {l} has no self_attn module")

        def hook(mod, args, output, l=l):
            if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
                attn[l] = output[1][0].float().cpu().numpy()

        handles.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        with RoutingRecorder(model, layers, info=session.info) as rec, torch.inference_mode():
            decoder(input_ids=torch.tensor([ids], device=device), use_cache=False, output_attentions=True)
            routed = rec.pop()
    finally:
        for h in handles:
            h.remove()
    missing = [l for l in layers if l not in attn]
    if missing:
        raise ValueError(f"the model returned no attention weights at layers {missing} (eager attention unavailable)")
    return attn, {l: (r.topk_ids.numpy(), r.topk_weights.numpy()) for l, r in routed.items()}


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    # average ranks over ties
    vals, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return (sums / counts)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a constant input."""
    if len(a) < 3:
        return float("nan")
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
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

    Parameters
    ----------
    attn_rows : list of np.ndarray
        Per prompt, float [n, n] head-mean attention (row i: where position i looks).
    expert_sets : list of np.ndarray
        Per prompt, int [n, k] experts.
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


def run_attention_routing(args: argparse.Namespace) -> int:
    """Per position: where it attends and which experts it gets; per layer: attention similarity vs expert overlap."""
    from rich.table import Table

    session = Session(args, attention=True)
    prompts = args.prompt or ["King is to queen as man is to woman", "2 + 3 = 5", "If it rains, the grass gets wet."]
    layers = choose_layers(args, sorted(session.info.layers), many=True)
    focus = layers[len(layers) // 2] if args.layer is None else args.layer
    rows_by_layer = {l: [] for l in layers}
    sets_by_layer = {l: [] for l in layers}
    con = console()
    detail = []
    for p in prompts:
        ids = session.encode(p)
        attn, routed = attention_and_routing(session, ids, layers)
        types = session.decoder.classify_ids(session.classifier, ids)
        for l in layers:
            rows_by_layer[l].append(attn[l].mean(0))
            sets_by_layer[l].append(routed[l][0])
        for shown in (layers if args.verbose else [focus]):
            mean = attn[shown].mean(0)
            t = Table(title=f"layer {shown}: {p!r}")
            for col in ("pos", "token", "type", "attends to (head mean)", "experts"):
                t.add_column(col)
            entry = []
            for i, tok in enumerate(types.tokens):
                top = np.argsort(-mean[i])[: args.top_attended]
                t.add_row(str(i), repr(tok)[1:-1], types.semantic[i],
                          " ".join(f"{types.tokens[j].strip() or repr(types.tokens[j])}@{j}:{mean[i, j]:.2f}" for j in top),
                          experts_str(routed[shown][0][i], routed[shown][1][i]))
                entry.append({"position": i, "token": tok, "attended": [[int(j), float(mean[i, j])] for j in top],
                              "experts": routed[shown][0][i].tolist()})
            con.print(t)
            detail.append({"prompt": p, "layer": shown, "positions": entry})
    stats = [attention_routing_stats(rows_by_layer[l], sets_by_layer[l], l) for l in layers]
    t = Table(title="attention similarity vs expert overlap over position pairs")
    for col in ("layer", "pairs", "Spearman", "Jaccard | similar attention", "Jaccard | dissimilar"):
        t.add_column(col, justify="right")
    for s in stats:
        t.add_row(str(s.layer), str(s.pairs), f"{s.spearman:.3f}", f"{s.same_expert_when_similar:.2f}",
                  f"{s.same_expert_when_dissimilar:.2f}")
    con.print(t)
    emit(args, {"action": "attention-routing", "model": session.spec, "layers": [s.to_dict() for s in stats],
                "prompts": detail})
    return 0


def run_attention_pattern(args: argparse.Namespace) -> int:
    """Each head's attention from one position at one layer, and the experts that position gets there."""
    from rich.table import Table

    session = Session(args, attention=True)
    prompt = args.prompt or "King is to queen as man is to woman"
    ids = session.encode(prompt)
    layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
    pos = len(ids) - 1 if args.position is None else args.position
    if not 0 <= pos < len(ids):
        raise ValueError(f"--position {pos} is out of range: the prompt has {len(ids)} tokens (0..{len(ids) - 1})")
    attn, routed = attention_and_routing(session, ids, [layer])
    types = session.decoder.classify_ids(session.classifier, ids)
    a = attn[layer][:, pos, : pos + 1]                              # [H, pos+1]
    con = console()
    con.print(f"layer {layer}, position {pos} {types.tokens[pos]!r} ({types.semantic[pos]}): experts "
              f"{experts_str(routed[layer][0][pos], routed[layer][1][pos])}")
    t = Table(title="attention per head (top positions)")
    t.add_column("head")
    t.add_column("attends to")
    t.add_column("entropy (bits)", justify="right")
    heads = []
    for h in range(a.shape[0]):
        top = np.argsort(-a[h])[: args.top_attended]
        p = a[h][a[h] > 0]
        ent = float(-(p * np.log2(p)).sum())
        t.add_row(str(h), " ".join(f"{types.tokens[j].strip() or repr(types.tokens[j])}@{j}:{a[h, j]:.2f}" for j in top),
                  f"{ent:.2f}")
        heads.append({"head": h, "weights": a[h].tolist(), "entropy_bits": ent})
    con.print(t)
    if args.verbose:
        for h in range(a.shape[0]):
            con.print(f"head {h}: " + " ".join(f"{j}:{a[h, j]:.3f}" for j in range(a.shape[1])))
    emit(args, {"action": "attention-pattern", "model": session.spec, "prompt": prompt, "layer": layer, "position": pos,
                "tokens": types.tokens, "experts": routed[layer][0][pos].tolist(),
                "expert_weights": routed[layer][1][pos].tolist(), "heads": heads})
    return 0


def register(actions: argparse._SubParsersAction) -> None:
    """Add attention-routing and attention-pattern."""
    p = actions.add_parser("attention-routing", help="attention weights next to the experts chosen, per position")
    add_common(p, many_layers=True, trace=False, model_required=True)
    p.add_argument("-p", "--prompt", action="append", default=None, help="prompt(s) (default: three built-in)")
    p.add_argument("--top-attended", type=int, default=3)
    p.set_defaults(func=run_attention_routing)
    p = actions.add_parser("attention-pattern", help="per-head attention of one position, and its experts")
    add_common(p, many_layers=False, trace=False, model_required=True)
    p.add_argument("-p", "--prompt", default=None)
    p.add_argument("--position", type=int, default=None, help="token position (default: last)")
    p.add_argument("--top-attended", type=int, default=4)
    p.set_defaults(func=run_attention_pattern)
