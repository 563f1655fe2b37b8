"""Actions `expert-profile` and `steer`: one expert described from a trace, and steered in a running model (thin CLI)."""

from __future__ import annotations

import argparse

from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit


def _fmt_share(iv) -> str:
    return f"{iv.estimate:.1%} [{iv.low:.1%}, {iv.high:.1%}]"


# ------------------------------------------------------------------------------------ expert-profile
def run_expert_profile(args: argparse.Namespace) -> int:
    """One expert's load, tokens, trigrams, domains, weights, top-logit contexts, co-activation and loss impact."""
    from lazarus_core.analysis.expert_profile import expert_profile
    from lazarus_core.cli.analysis_common import analysis_trace, write_csv_tables

    session = Session(args)
    layers = None
    if not args.trace:
        layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
        _check_expert(args.expert, session.info.layers[layer].num_experts, layer)
        layers = [layer]
    trace, labels = analysis_trace(args, session, logits=True, layers=layers)
    if args.trace:
        if args.layer is not None and args.layer not in trace.layers:
            raise ValueError(f"--layer {args.layer} was not captured in the trace: its layers are {sorted(trace.layers)}")
        layer = choose_layers(args, trace.layers, many=False)[0]
        _check_expert(args.expert, trace.num_experts, layer)
    model = None if args.no_loss else session.model
    prof = expert_profile(trace, layer, args.expert, tokenizer=session.tokenizer, classifier=session.classifier,
                          doc_labels=labels, model=model, view=args.view, top=args.top, min_count=args.min_count,
                          contexts=args.contexts, loss_documents=args.loss_documents,
                          baseline_experts=args.baseline_experts, seed=args.seed)
    _render_profile(prof)
    write_csv_tables(args, prof.tables())
    if args.plot:
        _plot_profile(prof, args.plot)
    emit(args, {"action": "expert-profile", "model": session.model_name, **prof.to_dict()})
    return 0


def _check_expert(expert: int, num_experts: int, layer: int) -> None:
    if not 0 <= expert < num_experts:
        raise ValueError(f"--expert {expert} is out of range: layer {layer} has {num_experts} experts "
                         f"(0..{num_experts - 1})")


def _render_profile(p) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = console()
    con.print(f"[bold]layer {p.layer}, expert E{p.expert}[/bold] over {p.tokens} tokens in {p.documents} documents")
    con.print(f"load (in top-{p.top_k}): {_fmt_share(p.load)} (documents: [{p.load_documents.low:.1%}, "
              f"{p.load_documents.high:.1%}]) vs uniform {p.uniform_load:.1%} -> x{p.load_ratio:.2f}")
    con.print(f"primary (slot 0): {_fmt_share(p.primary_share)} vs uniform {p.uniform_primary_share:.1%}")
    if p.mean_weight is not None:
        con.print(f"mean weight when selected: {p.mean_weight.estimate:.3f} [{p.mean_weight.low:.3f}, "
                  f"{p.mean_weight.high:.3f}] vs {p.mean_weight_layer:.3f} for any selected slot of the layer")
    for title, rows, extra in (("top tokens (lift vs the layer)", p.top_tokens, False),
                               ("top trigrams (lift vs the layer, and vs the current token's type)", p.top_trigrams, True),
                               ("domains (share routed vs uniform k/E)", p.domains, False)):
        if not rows:
            continue
        t = Table(title=title)
        for col in ("key", "count", "routed", "share [95% CI]", "baseline", "lift", *(("lift vs type",) if extra else ())):
            t.add_column(col, justify="left" if col == "key" else "right")
        for r in rows:
            t.add_row(escape(r.key), str(r.count), str(r.routed), _fmt_share(r.share), f"{r.baseline:.1%}", f"{r.lift:.2f}",
                      *((f"{r.lift_vs_type:.2f}" if r.lift_vs_type is not None else "-",) if extra else ()))
        con.print(t)
    if p.top_logit_contexts:
        t = Table(title=f"highest router logits of E{p.expert} (its mean logit {p.logit_mean:.2f})")
        for col in ("logit", "rank", "selected", "context"):
            t.add_column(col, justify="left" if col == "context" else "right")
        for c in p.top_logit_contexts:
            t.add_row(f"{c.logit:.2f}", str(c.rank), "yes" if c.selected else "no", escape(c.context))
        con.print(t)
    t = Table(title="co-activated experts (observed vs expected under independent top-k)")
    for col in ("expert", "count", "expected", "ratio"):
        t.add_column(col, justify="right")
    for c in p.coactivated:
        t.add_row(f"E{c.expert}", str(c.count), f"{c.expected:.1f}", f"{c.ratio:.2f}")
    con.print(t)
    if p.loss is not None:
        l, d = p.loss, p.loss.delta_nll
        con.print(f"ablating E{p.expert}: loss {l.nll_base:.4f} {d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}] "
                  f"nats/token ({l.documents} documents, {l.tokens} tokens{', includes 0' if l.includes_zero else ''}); "
                  f"ablating other experts {l.baseline_experts}: mean {l.baseline_mean:+.4f}")


def _plot_profile(p, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lazarus_core.cli.analysis_common import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    rows = p.top_tokens[:10]
    ax.barh([r.key for r in rows][::-1], [r.lift for r in rows][::-1])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_title(f"L{p.layer} E{p.expert}: token lift (1 = layer share)")
    ax = axes[1]
    if p.domains:
        ax.bar([d.key for d in p.domains], [d.share.estimate for d in p.domains],
               yerr=[[d.share.estimate - d.share.low for d in p.domains], [d.share.high - d.share.estimate for d in p.domains]])
        ax.axhline(p.uniform_load, color="k", lw=0.8, ls="--", label="uniform k/E")
        ax.legend()
        ax.tick_params(axis="x", rotation=45)
    ax.set_title("share of each domain's tokens routed")
    ax = axes[2]
    ax.bar([f"E{c.expert}" for c in p.coactivated], [c.count for c in p.coactivated], label="observed")
    ax.plot([f"E{c.expert}" for c in p.coactivated], [c.expected for c in p.coactivated], "k_", ms=14,
            label="expected (independent)")
    ax.legend()
    ax.set_title("co-activation")
    save_figure(fig, path)


# -------------------------------------------------------------------------------------------- steer
def _parse_floats(text: str | None, flag: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated numbers, got {text!r}") from None


def run_steer(args: argparse.Namespace) -> int:
    """Change one expert's routing weight at one position (or all) and show the next-token change and continuation."""
    from rich.markup import escape
    from rich.table import Table

    from lazarus_core.analysis.steering import steer
    from lazarus_core.cli.analysis_common import write_csv_tables

    session = Session(args)
    layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
    ids = session.encode(args.prompt)
    sweep = _parse_floats(args.sweep, "--sweep")
    res = steer(session.model, ids, layer, args.expert, mode=args.mode, value=args.value, target_idx=args.target_idx,
                tokenizer=session.tokenizer, sweep=sweep, max_new_tokens=args.max_new_tokens, top=args.top,
                baseline_experts=args.baseline_experts, seed=args.seed, info=session.info)
    con = console()
    where = "every position" if res.target_idx is None else f"position {res.target_idx}"
    rule = "the other selected experts share the rest" if res.renormalised else "the other weights unchanged"
    con.print(f"layer {layer}, E{res.expert} {res.mode} to weight {res.value:g} at {where} ({rule}); its weight "
              f"before: " + ", ".join(f"{w:.3f}" for w in res.weight_before[:12]) + (" ..." if len(res.weight_before) > 12 else ""))
    t = Table(title="next token at the last prompt position")
    for col in ("before", "p", "after", "p"):
        t.add_column(col, justify="right" if col == "p" else "left")
    for b, a in zip(res.top_before, res.top_after):
        t.add_row(escape(repr(b.token)), f"{b.prob:.3f}", escape(repr(a.token)), f"{a.prob:.3f}")
    con.print(t)
    con.print(f"KL(before || after) {res.kl:.4f} nats vs {res.kl_other_experts:.4f} for the same edit on experts "
              f"{res.other_experts}; top-1 {'changed' if res.top1_changed else 'unchanged'}")
    con.print(f"[bold]{escape(args.prompt)}[/bold]{escape(res.continuation_before)}   (before)")
    con.print(f"[bold]{escape(args.prompt)}[/bold]{escape(res.continuation_after)}   (after)")
    if res.sweep:
        t = Table(title="sweep")
        for col in ("value", "KL", "KL other experts", "top token", "p(top before)"):
            t.add_column(col, justify="right")
        for s in res.sweep:
            t.add_row(f"{s.value:g}", f"{s.kl:.4f}", f"{s.kl_other_experts:.4f}", escape(repr(s.top_token.token)),
                      f"{s.base_top_prob:.3f}")
        con.print(t)
    write_csv_tables(args, {"sweep": [dict(s.to_dict(), top_token=s.top_token.token) for s in res.sweep],
                            "next_token": [dict(rank=i, before=b.token, p_before=b.prob, after=a.token, p_after=a.prob)
                                           for i, (b, a) in enumerate(zip(res.top_before, res.top_after))]})
    if args.plot:
        _plot_steer(res, args.plot)
    emit(args, {"action": "steer", "model": session.model_name, "prompt": args.prompt, **res.to_dict()})
    return 0


def _plot_steer(res, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lazarus_core.cli.analysis_common import save_figure

    if res.sweep:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        v = [s.value for s in res.sweep]
        axes[0].plot(v, [s.kl for s in res.sweep], "o-", label=f"E{res.expert}")
        axes[0].plot(v, [s.kl_other_experts for s in res.sweep], "s--", label="other experts (mean)")
        axes[0].set_xlabel("weight")
        axes[0].set_ylabel("KL(before || after), nats")
        axes[0].legend()
        axes[1].plot(v, [s.base_top_prob for s in res.sweep], "o-")
        axes[1].set_xlabel("weight")
        axes[1].set_ylabel(f"p({res.top_before[0].token!r})")
        fig.suptitle(f"steering L{res.layer} E{res.expert}")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [t.token for t in res.top_before]
        after = {t.token_id: t.prob for t in res.top_after}
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [t.prob for t in res.top_before], 0.4, label="before")
        ax.bar([i + 0.2 for i in x], [after.get(t.token_id, float("nan")) for t in res.top_before], 0.4, label="after")
        ax.set_xticks(list(x), [repr(n) for n in names])
        ax.legend()
        ax.set_title(f"L{res.layer} E{res.expert} {res.mode}: next-token probabilities (KL {res.kl:.3f})")
    save_figure(fig, path)


def register(actions: argparse._SubParsersAction) -> None:
    """Add expert-profile and steer to `introspect moe-expert`."""
    from lazarus_core.cli.analysis_common import add_analysis_flags

    p = actions.add_parser("expert-profile", help="one expert: load, tokens, trigrams, domains, logits, co-activation, "
                                                  "loss impact")
    add_common(p, many_layers=False)
    add_analysis_flags(p)
    p.add_argument("--expert", type=int, required=True, help="the expert to profile")
    p.add_argument("--top", type=int, default=10, help="rows of the token and trigram tables")
    p.add_argument("--min-count", type=int, default=3, help="fewest occurrences of a token or trigram to be listed")
    p.add_argument("--contexts", type=int, default=5, help="highest-logit contexts shown")
    p.add_argument("--loss-documents", type=int, default=16, help="documents of the ablation loss measurement")
    p.add_argument("--baseline-experts", type=int, default=4, help="other experts ablated for the loss baseline")
    p.add_argument("--no-loss", action="store_true", help="skip the ablation loss (no model forward passes)")
    p.set_defaults(func=run_expert_profile)

    p = actions.add_parser("steer", help="change one expert's routing weight; next-token change and continuation")
    add_common(p, many_layers=False, trace=False, model_required=True, classifier=False)
    p.add_argument("--expert", type=int, required=True, help="the expert to steer")
    p.add_argument("--mode", choices=("boost", "ablate"), default="boost",
                   help="boost: set its post-softmax weight to --value; ablate: set it to 0")
    p.add_argument("--value", type=float, default=None,
                   help="boost: the expert's new weight (default: the routing's whole mass, 1.0 outside DeepSeek)")
    p.add_argument("--target-idx", type=int, default=None, metavar="POS",
                   help="edit only this prompt position (default: every position)")
    p.add_argument("-p", "--prompt", required=True, help="the prompt")
    p.add_argument("--sweep", default=None, metavar="V1,V2,...", help="boost values to sweep")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--top", type=int, default=5, help="next tokens listed")
    p.add_argument("--baseline-experts", type=int, default=4, help="other experts given the same edit (KL baseline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, metavar="FILE", help="write a figure (.png or .pdf)")
    p.add_argument("--csv", default=None, metavar="DIR", help="write the sweep and next-token tables as CSV")
    p.set_defaults(func=run_steer)
