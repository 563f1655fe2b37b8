"""Actions `attention-routing` and `attention-pattern`: the model's eager attention weights next to the experts chosen."""

from __future__ import annotations

import argparse

import numpy as np

from lazarus_core.analysis.attention_routing import attention_and_routing, attention_routing_stats, head_entropy_bits
from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit, experts_str, lit


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
        attn, routed = attention_and_routing(session.model, ids, layers, info=session.info)
        types = session.decoder.classify_ids(session.classifier, ids)
        for l in layers:
            rows_by_layer[l].append(attn[l].mean(0))
            sets_by_layer[l].append(routed[l][0])
        for shown in (layers if args.verbose else [focus]):
            mean = attn[shown].mean(0)
            t = Table(title=f"layer {shown}: {lit(repr(p))}")
            for col in ("pos", "token", "type", "attends to (head mean)", "experts"):
                t.add_column(col)
            entry = []
            for i, tok in enumerate(types.tokens):
                top = np.argsort(-mean[i])[: args.top_attended]
                t.add_row(str(i), lit(repr(tok)[1:-1]), lit(types.semantic[i]),
                          lit(" ".join(f"{types.tokens[j].strip() or repr(types.tokens[j])}@{j}:{mean[i, j]:.2f}"
                                       for j in top)),
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
    emit(args, {"action": "attention-routing", "model": session.model_name, "layers": [s.to_dict() for s in stats],
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
    attn, routed = attention_and_routing(session.model, ids, [layer], info=session.info)
    types = session.decoder.classify_ids(session.classifier, ids)
    a = attn[layer][:, pos, : pos + 1]                              # [H, pos+1]
    con = console()
    con.print(f"layer {layer}, position {pos} {lit(repr(types.tokens[pos]))} ({lit(types.semantic[pos])}): experts "
              f"{experts_str(routed[layer][0][pos], routed[layer][1][pos])}")
    t = Table(title="attention per head (top positions)")
    t.add_column("head")
    t.add_column("attends to")
    t.add_column("entropy (bits)", justify="right")
    heads = []
    for h in range(a.shape[0]):
        top = np.argsort(-a[h])[: args.top_attended]
        ent = float(head_entropy_bits(a[h]))
        t.add_row(str(h), lit(" ".join(f"{types.tokens[j].strip() or repr(types.tokens[j])}@{j}:{a[h, j]:.2f}"
                                       for j in top)),
                  f"{ent:.2f}")
        heads.append({"head": h, "weights": a[h].tolist(), "entropy_bits": ent})
    con.print(t)
    if args.verbose:
        for h in range(a.shape[0]):
            con.print(f"head {h}: " + " ".join(f"{j}:{a[h, j]:.3f}" for j in range(a.shape[1])))
    emit(args, {"action": "attention-pattern", "model": session.model_name, "prompt": prompt, "layer": layer, "position": pos,
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
