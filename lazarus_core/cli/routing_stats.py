"""Actions `analyze` (load and co-activation), `weights`, `trace` (one prompt, every layer) and `heatmap`."""

from __future__ import annotations

import argparse

import numpy as np

from lazarus_core.cli.analysis_common import save_figure
from lazarus_core.cli.routing_common import (Session, add_common, add_verify_flag, choose_layers, console, emit,
                                             experts_str, lit)


def _corpus_trace(args: argparse.Namespace, session: Session):
    from lazarus_core.trigram.prompts import resolve_categories, taxonomy_corpus

    if args.trace:
        return session.trace([])[0]
    if getattr(args, "prompt", None):
        return session.trace(list(args.prompt))[0]
    texts, labels = taxonomy_corpus(resolve_categories(args.categories), args.prompts_per_category, args.seed)
    return session.trace(texts, labels)[0]


def _corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--prompt", action="append", default=None, help="prompt(s) to capture (default: taxonomy prompts)")
    p.add_argument("--categories", default=None, help="categories of the default prompts (default all)")
    p.add_argument("--prompts-per-category", type=int, default=6)


def run_analyze(args: argparse.Namespace) -> int:
    """Expert load, load entropy, cold experts and over-represented co-activated pairs per layer."""
    from rich.table import Table

    from lazarus_core.trigram.usage import layer_usage

    session = Session(args)
    trace = _corpus_trace(args, session)
    layers = choose_layers(args, trace.layers, many=True)
    res = [layer_usage(trace.layer(l).topk_ids, trace.num_experts, layer=l, cold_threshold=args.cold_threshold,
                       min_count=args.min_count, top_pairs=args.top_pairs, keep_matrix=args.verbose or bool(args.output))
           for l in layers]
    con = console()
    t = Table(title=f"analyze: {trace.num_tokens} tokens, {trace.num_experts} experts, top-{trace.top_k}")
    for col in ("layer", "load entropy", "max", "cold experts", "busiest (share of tokens)", "top co-activated pairs (lift)"):
        t.add_column(col)
    for u in res:
        busiest = np.argsort(-np.array(u.load))[:3]
        t.add_row(str(u.layer), f"{u.load_entropy_bits:.2f}", f"{u.max_entropy_bits:.2f}", str(u.cold_experts or "-"),
                  " ".join(f"E{e}({u.load[e]:.0%})" for e in busiest),
                  " ".join(f"E{p.a}+E{p.b}({p.lift:.1f}x)" for p in u.top_pairs[:3]) or "-")
    con.print(t)
    if args.verbose:
        for u in res:
            con.print(f"L{u.layer} pairs (count / expected if independent): " + ", ".join(
                f"E{p.a}+E{p.b} {p.count}/{p.expected:.1f}" for p in u.top_pairs))
    emit(args, {"action": "analyze", "model": session.model_name, "num_tokens": trace.num_tokens,
                "layers": [u.to_dict() for u in res]})
    return 0


def run_weights(args: argparse.Namespace) -> int:
    """Routing-weight statistics per layer (per slot, row sums, router decisiveness, per expert)."""
    from rich.table import Table

    from lazarus_core.trigram.usage import layer_weights

    session = Session(args)
    trace = _corpus_trace(args, session)
    layers = choose_layers(args, trace.layers, many=True)
    res = [layer_weights(trace.layer(l).topk_ids, trace.layer(l).topk_weights, trace.num_experts, layer=l)
           for l in layers]
    con = console()
    conv = trace.meta.get("weight_convention", {})
    t = Table(title=f"weights ({trace.meta.get('family')}: scoring {conv.get('scoring')}, "
                    f"renormalised {conv.get('renormalize')})")
    for col in ("layer", "mean weight per slot", "row sum", "slot0 - slot1"):
        t.add_column(col)
    for w in res:
        t.add_row(str(w.layer), " ".join(f"{m:.3f}" for m in w.rank_mean), f"{w.row_sum_mean:.3f} ± {w.row_sum_std:.3f}",
                  f"{w.primary_margin_mean:.3f}")
    con.print(t)
    if args.verbose:
        for w in res:
            con.print(f"L{w.layer} mean weight when chosen: " + " ".join(
                f"E{e}:{m:.2f}" for e, m in enumerate(w.expert_mean_weight) if m == m))
    emit(args, {"action": "weights", "model": session.model_name, "weight_convention": conv,
                "layers": [w.to_dict() for w in res]})
    return 0


def run_trace(args: argparse.Namespace) -> int:
    """Every token of one prompt (or one document of a trace) through every layer: experts and weights."""
    from rich.table import Table

    session = Session(args)
    if args.trace:
        trace = session.reuse_trace(args.trace, verify=args.verify)
        span = trace.document(args.doc)
        types = session.decoder.classify_ids(session.classifier, span.token_ids)
        layers = choose_layers(args, trace.layers, many=True)
        routing = {l: (span.layer(l).topk_ids, span.layer(l).topk_weights) for l in layers}
        text = "".join(types.tokens)
        ids = span.token_ids.tolist()
    else:
        if not args.prompt:
            raise ValueError("trace needs -p PROMPT (or --trace DIR --doc N)")
        r = session.route(args.prompt)
        layers = choose_layers(args, sorted(r.layers), many=True)
        types, routing, text, ids = r.types, {l: r.layers[l] for l in layers}, r.text, r.token_ids
    con = console()
    t = Table(title=f"routing trace: {lit(repr(text[:60]))}")
    for col in ("pos", "token", "type"):
        t.add_column(col)
    for l in layers:
        t.add_column(f"L{l}")
    for i, tok in enumerate(types.tokens):
        t.add_row(str(i), lit(repr(tok)[1:-1]), lit(types.view(args.view)[i]),
                  *(experts_str(routing[l][0][i], routing[l][1][i] if args.verbose else None) for l in layers))
    con.print(t)
    prim = np.stack([routing[l][0][:, 0] for l in layers], 1)
    changes = (prim[:, 1:] != prim[:, :-1]).sum(1) if len(layers) > 1 else np.zeros(len(prim), int)
    con.print(f"distinct primary-expert paths: {len({tuple(p) for p in prim.tolist()})} over {len(prim)} tokens")
    emit(args, {"action": "trace", "model": session.model_name, "text": text, "token_ids": ids, "types": types.to_dict(),
                "layers": {str(l): {"topk_ids": np.asarray(routing[l][0]).tolist(),
                                    "topk_weights": np.round(np.asarray(routing[l][1], dtype=float), 6).tolist()}
                           for l in layers},
                "primary_changes_across_layers": changes.tolist()})
    return 0


_SHADES = " ░▒▓█"


def render_heatmap(matrix: np.ndarray, row_labels: list[str]) -> str:
    """A text heatmap of ``matrix`` [R, C] (each cell shaded by value / max)."""
    top = float(matrix.max()) if matrix.size else 0.0
    lines = ["      " + "".join(f"{c % 100:>3d}" for c in range(matrix.shape[1]))]
    for label, row in zip(row_labels, matrix):
        cells = "".join(" " + _SHADES[min(4, int(v / top * 4.999)) if top > 0 else 0] * 2 for v in row)
        lines.append(f"{label:>5} {cells}")
    lines.append(f"shade: ' ' 0 ... '█' {top:.3f} (share of tokens routed to the expert)")
    return "\n".join(lines)


def run_heatmap(args: argparse.Namespace) -> int:
    """Layer x expert load (share of tokens routed to each expert), in the terminal and optionally as a PNG."""
    session = Session(args)
    trace = _corpus_trace(args, session)
    layers = choose_layers(args, trace.layers, many=True)
    n = max(trace.num_tokens, 1)
    col = 0 if args.slots == "primary" else slice(None)
    mat = np.stack([np.bincount(np.asarray(trace.layer(l).topk_ids[:, col]).reshape(-1), minlength=trace.num_experts) / n
                    for l in layers])
    con = console()
    con.print(f"expert load per layer ({args.slots} slots), {trace.num_tokens} tokens")
    con.print(render_heatmap(mat, [f"L{l}" for l in layers]), markup=False, highlight=False)
    if args.verbose:
        from rich.table import Table

        t = Table(title="share of tokens routed to each expert")
        t.add_column("layer")
        for e in range(trace.num_experts):
            t.add_column(f"E{e}", justify="right")
        for l, row in zip(layers, mat):
            t.add_row(str(l), *(f"{v:.3f}" for v in row))
        con.print(t)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4, trace.num_experts * 0.25 + 2), max(2.5, len(layers) * 0.3 + 1.5)))
        im = ax.imshow(mat, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        ax.set_title(f"expert load ({args.slots} slots, {trace.num_tokens} tokens)")
        fig.colorbar(im, ax=ax, label="share of tokens")
        fig.tight_layout()
        save_figure(fig, args.plot)
        con.print(f"wrote {lit(args.plot)}")
    emit(args, {"action": "heatmap", "model": session.model_name, "slots": args.slots, "layers": layers,
                "num_experts": trace.num_experts, "load": mat.tolist()})
    return 0


def register(actions: argparse._SubParsersAction) -> None:
    """Add analyze, weights, trace and heatmap."""
    p = actions.add_parser("analyze", help="expert load, cold experts and co-activation per layer")
    add_common(p, many_layers=True, classifier=False)
    _corpus_flags(p)
    p.add_argument("--cold-threshold", type=float, default=0.1, help="cold = load below this x uniform (0.1)")
    p.add_argument("--min-count", type=int, default=5, help="pairs seen fewer times are not ranked")
    p.add_argument("--top-pairs", type=int, default=10)
    p.set_defaults(func=run_analyze)
    p = actions.add_parser("weights", help="routing-weight statistics per layer")
    add_common(p, many_layers=True, classifier=False)
    _corpus_flags(p)
    p.set_defaults(func=run_weights)
    p = actions.add_parser("trace", help="one prompt through every layer: experts and weights per token")
    add_common(p, many_layers=True, trace=False)
    p.add_argument("-p", "--prompt", default=None, help="the prompt")
    p.add_argument("--trace", default=None, metavar="DIR", help="show a document of this trace instead")
    p.add_argument("--doc", type=int, default=0, help="document of --trace (default 0)")
    add_verify_flag(p)
    p.set_defaults(func=run_trace)
    p = actions.add_parser("heatmap", help="layer x expert load heatmap (terminal; --plot FILE.png)")
    add_common(p, many_layers=True, classifier=False)
    _corpus_flags(p)
    p.add_argument("--slots", default="all", choices=("all", "primary"))
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also save a figure")
    p.set_defaults(func=run_heatmap)
