"""Actions attention-prediction, context-attention-routing, task-prediction of the dynamics study (thin CLI over the library analyses)."""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import numpy as np

from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit


def _iv(iv, pct: bool = True) -> str:
    if pct:
        return f"{iv.estimate:.1%} [{iv.low:.1%}, {iv.high:.1%}]"
    return f"{iv.estimate:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"


def _ivc(iv) -> str:
    return f"{iv.estimate:.1%} [{iv.low:.0%},{iv.high:.0%}]"


def _positive(value, flag: str, minimum: float = 1) -> None:
    if value < minimum:
        raise ValueError(f"{flag} must be >= {minimum:g}, got {value}")


@contextmanager
def _bar(description: str, total: int):
    """A transient rich progress bar; yields ``update(done)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True, console=console()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


def _trace_layers(args: argparse.Namespace, trace, *, many: bool) -> list[int]:
    """``--layer``/``--layers`` checked against the layers a ``--trace`` holds."""
    try:
        return choose_layers(args, trace.layers, many=many)
    except ValueError as exc:
        if not getattr(args, "trace", None):
            raise
        raise ValueError(str(exc).replace("the MoE layers are", "the trace's layers are")) from None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------- attention-prediction
def run_attention_prediction(args: argparse.Namespace) -> int:
    """Attention output -> primary expert / top-k set (linear probe, held-out documents) and the logit split."""
    from lazarus_core.analysis.attention_features import attention_features_for_trace, trace_windows
    from lazarus_core.analysis.attention_prediction import (AttentionPrediction, attention_prediction,
                                                            layers_per_pass)
    from lazarus_core.cli.analysis_common import analysis_trace, write_csv_tables

    _positive(args.steps, "--steps")
    _positive(args.num_tokens, "--num-tokens")
    if args.l2 < 0:
        raise ValueError(f"--l2 must be >= 0, got {args.l2}")
    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    session = Session(args)
    layers = None if args.trace else choose_layers(args, sorted(session.info.layers), many=True)
    trace, _ = analysis_trace(args, session, layers=layers)
    if args.trace:
        layers = _trace_layers(args, trace, many=True)
    model = session.model
    tokens = sum(b - a for a, b in trace_windows(trace, args.num_tokens))
    group = layers_per_pass(tokens, int(model.config.hidden_size))
    results, agreements = [], []
    with _bar("attention features and probes", 2 * len(layers) * tokens) as update:   # features, then probes
        for start in range(0, len(layers), group):
            chunk = layers[start:start + group]
            base = 2 * start * tokens
            feats = attention_features_for_trace(model, trace, chunk, max_tokens=args.num_tokens, info=session.info,
                                                 progress=lambda done, base=base, n=len(chunk): update(base + done * n))
            base += len(chunk) * tokens
            labels = {l: np.asarray(trace.layer(l).topk_ids)[feats.rows] for l in chunk}
            weights = {l: np.asarray(trace.layer(l).topk_weights)[feats.rows] for l in chunk}
            part = attention_prediction(feats, labels=labels, label_weights=weights, test_fraction=args.test_fraction,
                                        l2=args.l2, steps=args.steps, seed=args.seed,
                                        decompose=not args.no_decomposition,
                                        progress=lambda i, base=base: update(base + i * tokens))
            results.extend(part.layers)
            agreements.append(part.routing_agreement)
            del feats
    res = AttentionPrediction(results, float(np.mean(agreements)), args.test_fraction, args.l2, args.steps, args.seed,
                              "trace")
    _render_attention_prediction(res)
    write_csv_tables(args, res.tables())
    if args.plot:
        _plot_attention_prediction(res, args.plot)
    emit(args, {"action": "attention-prediction", "model": session.spec, "tokens": tokens, **res.to_dict()})
    return 0


def _render_attention_prediction(res) -> None:
    from rich.table import Table

    con = console()
    first = res.layers[0]
    con.print(f"held-out documents: {first.test_documents} ({first.test_tokens} tokens); trained on "
              f"{first.train_documents} documents ({first.train_tokens} tokens); routing recomputed = trace's primary "
              f"at {res.routing_agreement:.1%} of tokens")
    short = {"majority": "majority", "token_lookup": "token", "attention_probe": "attention", "residual_probe": "residual",
             "router_input_probe": "router input"}
    for what, title in (("accuracy", "primary-expert accuracy"), ("topk_recall", "top-k recall")):
        t = Table(title=f"{title} on held-out documents [95% CI over documents]")
        t.add_column("layer", justify="right")
        for p in first.predictors:
            t.add_column(short.get(p.name, p.name), justify="right")
        if what == "accuracy":
            t.add_column("attention - best baseline", justify="right")
        for l in res.layers:
            cells = [f"{getattr(p, what).estimate:.1%} [{getattr(p, what).low:.0%},{getattr(p, what).high:.0%}]"
                     for p in l.predictors]
            if what == "accuracy":
                cells.append(f"{_iv(l.attention_gain, False)} ({short[l.best_baseline]})")
            t.add_row(str(l.layer), *cells)
        con.print(t)
    if any(l.decomposition is not None for l in res.layers):
        t = Table(title="router-logit variance: share from the attention output vs the residual stream")
        for col in ("layer", "attention share [CI]", "residual", "attn alone", "resid alone", "cross",
                    "random routers", "attn energy", "split err"):
            t.add_column(col, justify="right")
        for l in res.layers:
            d = l.decomposition
            if d is None:
                continue
            rr = d.random_router_attention_share
            t.add_row(str(l.layer), _iv(d.attention_share), f"{d.residual_share.estimate:.1%}",
                      f"{d.attention_alone:.1%}", f"{d.residual_alone:.1%}", f"{d.cross_term:+.1%}",
                      f"{rr.estimate:.1%} [{rr.low:.0%}, {rr.high:.0%}]", f"{d.attention_norm_share:.1%}",
                      f"{d.reconstruction_error:.1e}" if d.reconstruction_error is not None else "-")
        con.print(t)
        con.print("share = cov(part, logits) / var(logits), logits centred per token over the experts; the two shares "
                  "sum to 1. A share near the random-router value says no more than the parts' magnitudes.")


def _plot_attention_prediction(res, path: str) -> None:
    from lazarus_core.cli.analysis_common import save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    layers = [l.layer for l in res.layers]
    names = [p.name for p in res.layers[0].predictors]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        acc = [l.predictor(name).accuracy for l in res.layers]
        x = np.arange(len(layers)) + (i - len(names) / 2 + 0.5) * width
        axes[0].bar(x, [a.estimate for a in acc], width, label=name,
                    yerr=[[a.estimate - a.low for a in acc], [a.high - a.estimate for a in acc]])
    axes[0].set_xticks(range(len(layers)), [f"L{l}" for l in layers])
    axes[0].set_ylabel("held-out primary accuracy")
    axes[0].legend(fontsize=7)
    dec = [(l.layer, l.decomposition) for l in res.layers if l.decomposition is not None]
    if dec:
        x = np.arange(len(dec))
        a = [d.attention_share for _, d in dec]
        axes[1].errorbar(x, [v.estimate for v in a], yerr=[[v.estimate - v.low for v in a], [v.high - v.estimate for v in a]],
                         fmt="o-", label="attention share")
        rr = [d.random_router_attention_share for _, d in dec]
        axes[1].fill_between(x, [v.low for v in rr], [v.high for v in rr], alpha=0.3, label="random routers")
        axes[1].set_xticks(x, [f"L{l}" for l, _ in dec])
        axes[1].set_ylabel("share of router-logit variance")
        axes[1].legend()
    save_figure(fig, path)


# ------------------------------------------------------------------------------ context-attention-routing
def run_context_attention_routing(args: argparse.Namespace) -> int:
    """The token in N contexts: attention-similarity vs routing-similarity matrices, Mantel test per layer."""
    from lazarus_core.analysis.attention_features import attention_features_for_trace, trace_windows
    from lazarus_core.analysis.context_attention_routing import context_attention_routing, router_probabilities
    from lazarus_core.analysis.context_routing import check_token, default_contexts, token_occurrences
    from lazarus_core.cli.analysis_common import write_csv_tables

    _positive(args.permutations, "--permutations")
    _positive(args.max_contexts, "--max-contexts", 3)
    rows_mode = args.attention_similarity == "rows"
    session = Session(args, attention=rows_mode)
    if args.trace:
        trace, contexts = session.trace([])[0], None
    else:
        check_token(session.tokenizer, args.token)
        contexts = args.contexts or default_contexts(args.token)
        trace = session.trace(contexts)[0]
    check_token(session.tokenizer, args.token)
    layers = _trace_layers(args, trace, many=True)
    occ = token_occurrences(trace, session.decoder, session.classifier, args.token, args.view, contexts)
    first = {}
    for o in occ:
        first.setdefault(o.doc, o)
    items = [first[d] for d in sorted(first)][: args.max_contexts]
    if len(items) < 3:
        raise ValueError(f"--token {args.token!r} occurs in {len(items)} context(s); the Mantel test needs at least 3: "
                         "give more --contexts")
    rows = np.array([o.row for o in items], np.int64)
    labels = [contexts[o.doc] if contexts else o.context for o in items]
    feats = attention_features_for_trace(session.model, trace, layers, info=session.info)
    where = {int(r): i for i, r in enumerate(feats.rows)}
    idx = np.array([where[int(r)] for r in rows])
    experts = {l: np.asarray(trace.layer(l).topk_ids)[rows] for l in layers}
    probs = {l: router_probabilities(feats.layers[l].logits[idx], session.info.rule.scoring) for l in layers}
    if rows_mode:
        attention = _attention_rows(session, trace, rows, layers, trace_windows(trace))
    else:
        attention = {l: feats.layers[l].attention[idx] for l in layers}
    res = context_attention_routing(args.token, labels, attention, experts, probabilities=probs,
                                    attention_similarity=args.attention_similarity,
                                    routing_similarity=args.routing_similarity, permutations=args.permutations,
                                    alternative=args.alternative, seed=args.seed)
    _render_context_attention_routing(res, args.verbose)
    write_csv_tables(args, res.tables())
    if args.plot:
        _plot_context_attention_routing(res, args.plot, args.layer)
    emit(args, {"action": "context-attention-routing", "model": session.spec, **res.to_dict(),
                "occurrences": [o.to_dict() for o in items]})
    return 0


def _attention_rows(session, trace, rows, layers, spans) -> dict[int, np.ndarray]:
    """Per layer, float [n, max p + 1]: the head-mean attention row of each occurrence, aligned by distance."""
    from lazarus_core.analysis.attention_routing import attention_and_routing
    from lazarus_core.analysis.context_attention_routing import offset_profiles

    token_ids = np.asarray(trace.token_ids)
    per_layer = {l: [] for l in layers}
    for r in rows:
        a, b = next((a, b) for a, b in spans if a <= r < b)
        attn, _ = attention_and_routing(session.model, token_ids[a:b].tolist(), layers, info=session.info)
        pos = int(r - a)
        for l in layers:
            per_layer[l].append(attn[l].mean(0)[pos, : pos + 1])
    return {l: offset_profiles(v) for l, v in per_layer.items()}


def _render_context_attention_routing(res, verbose: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = console()
    con.print(f"{escape(repr(res.token))} in {len(res.contexts)} contexts; attention similarity: {res.definitions['attention']}; "
              f"routing similarity: {res.definitions['routing']}")
    t = Table(title="Mantel test per layer: Spearman of attention vs routing similarity over context pairs")
    for col in ("layer", "Spearman [95% CI]", "permutation null", "p", "q (BH)", "attn sim", "routing sim",
                "primaries"):
        t.add_column(col, justify="right")
    for l in res.layers:
        m = l.mantel
        t.add_row(str(l.layer), f"{m.statistic:+.3f} [{m.interval.low:+.2f}, {m.interval.high:+.2f}]",
                  f"{m.null_mean:+.3f} [{m.null_low:+.2f}, {m.null_high:+.2f}]",
                  f"{m.p_value:.3g}{' (exact)' if m.exact else ''}", f"{l.q_value:.3g}",
                  f"{l.mean_attention_similarity:.3f}", f"{l.mean_routing_similarity:.3f}",
                  f"{l.distinct_primary}/{len(res.contexts)}")
    con.print(t)
    if verbose:
        for i, c in enumerate(res.contexts):
            con.print(f"[{i}] {escape(c)}: " + " ".join(f"L{l}:{'/'.join(f'E{e}' for e in ex[i])}"
                                                         for l, ex in res.experts.items()))


def _plot_context_attention_routing(res, path: str, layer: int | None) -> None:
    from lazarus_core.cli.analysis_common import save_figure

    plt = _plt()
    focus = next((l for l in res.layers if l.layer == layer), res.layers[len(res.layers) // 2])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    iu = np.triu_indices(len(res.contexts), 1)
    axes[0].scatter(focus.attention_similarity[iu], focus.routing_similarity[iu], s=14)
    axes[0].set_xlabel("attention similarity")
    axes[0].set_ylabel("routing similarity")
    axes[0].set_title(f"L{focus.layer}: context pairs (Spearman {focus.mantel.statistic:+.2f}, p {focus.mantel.p_value:.3g})")
    x = np.arange(len(res.layers))
    m = [l.mantel for l in res.layers]
    axes[1].errorbar(x, [v.statistic for v in m], yerr=[[v.statistic - v.interval.low for v in m],
                                                        [v.interval.high - v.statistic for v in m]], fmt="o", label="observed")
    axes[1].fill_between(x, [v.null_low for v in m], [v.null_high for v in m], alpha=0.3, label="permutation null")
    axes[1].set_xticks(x, [f"L{l.layer}" for l in res.layers])
    axes[1].set_ylabel("Mantel Spearman")
    axes[1].legend()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------- task-prediction
def run_task_prediction(args: argparse.Namespace) -> int:
    """From the probe layer's hidden state, a prefetch set of m experts for every later layer."""
    from lazarus_core.analysis.task_prediction import expert_bytes_per_layer, task_prediction
    from lazarus_core.cli.analysis_common import analysis_trace, write_csv_tables

    _positive(args.steps, "--steps")
    _positive(args.num_tokens, "--num-tokens")
    if args.bandwidth_gbs <= 0:
        raise ValueError(f"--bandwidth-gbs must be > 0, got {args.bandwidth_gbs}")
    if args.l2 < 0:
        raise ValueError(f"--l2 must be >= 0, got {args.l2}")
    session = Session(args)
    if args.trace:
        trace, _ = analysis_trace(args, session, hidden_states=True)
        available = list(trace.layers)
    else:
        trace, available = None, sorted(session.info.layers)
    probe, targets = _probe_and_targets(args, available, "the trace's layers are" if args.trace else "the MoE layers are")
    num_experts = trace.num_experts if trace is not None else session.info.num_experts
    if args.prefetch_size is not None and not 1 <= args.prefetch_size <= num_experts:
        raise ValueError(f"--prefetch-size must be in 1..{num_experts} (the layer's experts), got {args.prefetch_size}")
    if trace is None:
        trace, _ = analysis_trace(args, session, hidden_states=True, layers=[probe, *targets])
    acts = trace.activations(probe)
    hidden, rows = acts.hidden[: args.num_tokens], acts.sample_index[: args.num_tokens]
    loaded = session._model is not None
    sizes, source = expert_bytes_per_layer(session.spec, targets, revision=args.revision,
                                           model=session.model if loaded else None,
                                           info=session.info if loaded else None)
    with _bar("prefetch probes", len(targets)) as update:
        res = task_prediction(hidden, rows, np.asarray(trace.doc_ids), np.asarray(trace.positions),
                              {l: np.asarray(trace.layer(l).topk_ids) for l in targets}, probe_layer=probe,
                              num_experts=trace.num_experts, prefetch_size=args.prefetch_size,
                              expert_bytes=sizes or None, bytes_source=source, bandwidth_gbs=args.bandwidth_gbs,
                              test_fraction=args.test_fraction, l2=args.l2, steps=args.steps, seed=args.seed,
                              progress=update)
    _render_task_prediction(res)
    write_csv_tables(args, res.tables())
    if args.plot:
        _plot_task_prediction(res, args.plot)
    emit(args, {"action": "task-prediction", "model": session.spec, **res.to_dict()})
    return 0


def _probe_and_targets(args: argparse.Namespace, available: list[int], where: str) -> tuple[int, list[int]]:
    available = sorted(available)
    probe = available[0] if args.probe_layer is None else args.probe_layer
    if probe not in available:
        raise ValueError(f"--probe-layer {probe} is out of range: {where} {available}")
    explicit = args.layer is not None or (args.layers is not None and args.layers.strip().lower() != "all")
    try:
        chosen = choose_layers(args, available, many=True)
    except ValueError as exc:
        raise ValueError(str(exc).replace("the MoE layers are", where)) from None
    early = [l for l in chosen if l <= probe]
    if explicit and early:
        raise ValueError(f"--layer/--layers {','.join(map(str, early))} not after --probe-layer {probe}: the target "
                         "layers must come later than the probe layer")
    targets = [l for l in chosen if l > probe]
    if not targets:
        raise ValueError(f"--probe-layer {probe} has no later MoE layer to predict ({where} {available}): "
                         "choose an earlier probe layer")
    return probe, targets


def _render_task_prediction(res) -> None:
    from rich.table import Table

    con = console()
    con.print(f"probe layer {res.probe_layer}: trained on {res.train_documents} documents ({res.train_tokens} tokens), "
              f"held out {res.test_documents} documents ({res.test_tokens} tokens)")
    t = Table(title="prefetch set of m experts per token: recall (share of the k used that were prefetched) "
                    "[95% CI over documents], precision")
    for col in ("layer", "m/E", "probe", "most frequent", "previous token", "probe - best", "precision",
                "avoided"):
        t.add_column(col, justify="right")
    for l in res.layers:
        p, f, q = (l.prefetcher(n) for n in ("probe", "most_frequent", "previous_token"))
        t.add_row(str(l.layer), f"{l.prefetch_size}/{l.num_experts}", _ivc(p.recall), _ivc(f.recall), _ivc(q.recall),
                  _iv(l.recall_gain, False), _ivc(p.precision),
                  f"{1 - l.prefetch_size / l.num_experts:.0%}")
    con.print(t)
    con.print("probe - best: paired recall difference against the better baseline ("
              + ", ".join(f"L{l.layer}: {l.best_baseline}" for l in res.layers) + "); avoided: experts not loaded ahead")
    if any(l.cost is not None for l in res.layers):
        t = Table(title=f"memory / transfer at {res.bandwidth_gbs:g} GB/s (expert sizes: {res.bytes_source})")
        for col in ("layer", "bytes/expert", "resident (m)", "all experts", "prefetch ms", "miss ms/token",
                    "miss ms/token (frequent)"):
            t.add_column(col, justify="right")
        for l in res.layers:
            c = l.cost
            if c is None:
                continue
            t.add_row(str(l.layer), f"{c.expert_bytes:,}", f"{c.resident_bytes:,}", f"{c.all_bytes:,}",
                      f"{c.prefetch_ms:.3f}", f"{c.miss_ms_per_token:.3f}", f"{c.miss_ms_per_token_most_frequent:.3f}")
        con.print(t)


def _plot_task_prediction(res, path: str) -> None:
    from lazarus_core.cli.analysis_common import save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    focus = res.layers[0]
    ms = [c["m"] for c in focus.curve]
    for name in ("probe", "most_frequent", "previous_token"):
        axes[0].plot(ms, [c[name] for c in focus.curve], "o-", label=name)
    axes[0].axvline(focus.prefetch_size, color="k", lw=0.8, ls="--")
    axes[0].set_xlabel("prefetch size m")
    axes[0].set_ylabel("recall")
    axes[0].set_title(f"L{res.probe_layer} -> L{focus.layer}")
    axes[0].legend()
    x = np.arange(len(res.layers))
    for i, name in enumerate(("probe", "most_frequent", "previous_token")):
        rec = [l.prefetcher(name).recall for l in res.layers]
        axes[1].errorbar(x + (i - 1) * 0.15, [r.estimate for r in rec],
                         yerr=[[r.estimate - r.low for r in rec], [r.high - r.estimate for r in rec]], fmt="o", label=name)
    axes[1].set_xticks(x, [f"L{l.layer}" for l in res.layers])
    axes[1].set_ylabel(f"recall at m = {focus.prefetch_size}")
    axes[1].legend()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------- register
def _add_probe_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-fraction", type=float, default=0.3, help="share of documents held out (default 0.3)")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty of the linear probes (default 1e-3)")
    p.add_argument("--steps", type=int, default=200, help="L-BFGS iterations of each probe (default 200)")


def register(actions: argparse._SubParsersAction) -> None:
    """Add this module's actions to `introspect moe-expert`."""
    from lazarus_core.cli.analysis_common import add_analysis_flags

    p = actions.add_parser("attention-prediction",
                           help="predict each layer's experts from the attention output alone (held-out probe vs "
                                "majority, token lookup, router input); router-logit variance from attention")
    add_common(p, many_layers=True, classifier=False)
    add_analysis_flags(p)
    _add_probe_flags(p)
    p.add_argument("--no-decomposition", action="store_true", help="skip the router-logit decomposition")
    p.set_defaults(func=run_attention_prediction)

    p = actions.add_parser("context-attention-routing",
                           help="one token in N contexts: attention similarity vs routing similarity (Mantel test)")
    add_common(p, many_layers=True)
    p.add_argument("-t", "--token", default="127", help="the word or token to follow (default 127)")
    p.add_argument("--contexts", nargs="+", default=None, metavar="TEXT",
                   help="contexts holding the token (default: ten built-in kinds)")
    p.add_argument("--attention-similarity", choices=("output", "rows"), default="output",
                   help="output: cosine of the token's attention-output vectors (default); rows: cosine of its "
                        "head-mean attention rows aligned by distance (eager attention)")
    p.add_argument("--routing-similarity", choices=("jaccard", "probability"), default="jaccard",
                   help="jaccard: top-k set overlap (default); probability: correlation of router probabilities")
    p.add_argument("--permutations", type=int, default=999, help="context permutations of the Mantel p (default 999)")
    p.add_argument("--max-contexts", type=int, default=200,
                   help="use at most this many contexts (the first ones holding the token; default 200)")
    p.add_argument("--alternative", choices=("greater", "two-sided"), default="greater",
                   help="greater (default): similar attention goes with similar routing")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a figure (.png or .pdf)")
    p.add_argument("--csv", default=None, metavar="DIR", help="write the per-layer and per-pair tables as CSV")
    p.set_defaults(func=run_context_attention_routing)

    p = actions.add_parser("task-prediction",
                           help="from layer P's hidden state, prefetch the experts later layers will use "
                                "(held-out recall vs most-frequent and previous-token sets; bytes and transfer time)")
    add_common(p, many_layers=True, classifier=False)
    add_analysis_flags(p)
    _add_probe_flags(p)
    p.add_argument("-p", "--probe-layer", type=int, default=None,
                   help="the layer whose hidden state (router input) predicts (default: the first MoE layer)")
    p.add_argument("--prefetch-size", type=int, default=None, metavar="M",
                   help="experts prefetched per token and layer (default k)")
    p.add_argument("--bandwidth-gbs", type=float, default=25.0,
                   help="host-to-device bandwidth in GB/s for the transfer times (default 25, about PCIe 4.0 x16)")
    p.set_defaults(func=run_task_prediction)
