"""Actions expert-interference, expert-merging, routing-manipulation of the dynamics study (thin CLI over the library analyses)."""

from __future__ import annotations

import argparse

from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit, parse_int_list


def _ci(iv, fmt: str = "+.4f") -> str:
    if iv is None:
        return "-"
    return f"{iv.estimate:{fmt}} [{iv.low:{fmt}}, {iv.high:{fmt}}]"


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ValueError(f"{flag} must be at least 1, got {value}")
    return value


def _progress(total: int, description: str):
    from lazarus_core.overlay.compute import progress_bar

    return progress_bar(True, total, description)


def _decoder(tokenizer):
    from lazarus_core.tokens import PieceDecoder

    decoder = PieceDecoder(tokenizer)
    return lambda i: decoder.text(int(i))


def _trace_and_layers(args, session, **fields):
    """The trace (``--trace`` or a capture of the chosen layers) and ``--layer``/``--layers`` checked against it."""
    from lazarus_core.cli.analysis_common import analysis_trace

    if args.trace:
        trace, _ = analysis_trace(args, session, **fields)
        return trace, choose_layers(args, sorted(trace.layers), many=True)
    layers = choose_layers(args, sorted(session.info.layers), many=True)
    trace, _ = analysis_trace(args, session, layers=layers, **fields)
    return trace, layers


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------- expert-interference
def run_expert_interference(args: argparse.Namespace) -> int:
    """Loss, KL and top-1 agreement at k = 1..K (all layers, each layer), degraded inputs, pair compatibility."""
    from lazarus_core.analysis.expert_interference import default_k_values, expert_interference, trace_windows
    from lazarus_core.cli.analysis_common import write_csv_tables

    _positive(args.documents, "--documents")
    session = Session(args)
    k_values = parse_int_list(args.k_values, "--k-values")
    trace, layers = _trace_and_layers(args, session)
    K = session.info.top_k
    if k_values is not None:
        bad = [k for k in k_values if not 1 <= k <= K]
        if bad or not k_values:
            raise ValueError(f"--k-values {args.k_values} out of range: k must be between 1 and the model's top-k {K}")
    windows = trace_windows(trace, max_documents=args.documents, max_tokens=args.num_tokens)
    if not windows:
        raise ValueError("the corpus has no document with two tokens to predict")
    ks = sorted(set(k_values or default_k_values(K)) | {K})
    scopes = 1 + (len(layers) if len(layers) > 1 and not args.no_per_layer else 0)
    total = scopes * len(ks) + (len(layers) * args.pairs if K >= 2 else 0)
    with _progress(total, "expert-interference") as advance:
        res = expert_interference(session.model, windows, trace=trace, k_values=k_values, layers=layers,
                                  per_layer=not args.no_per_layer, pairs=args.pairs, info=session.info,
                                  decode=_decoder(session.tokenizer), top=args.top, seed=args.seed,
                                  progress=lambda: advance())
    _render_interference(res)
    write_csv_tables(args, res.tables())
    if args.plot:
        _plot_interference(res, args.plot)
    emit(args, {"action": "expert-interference", "model": session.model_name, **res.to_dict()})
    return 0


def _render_interference(res) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = console()
    con.print(f"[bold]expert interference[/bold]: {res.documents} documents, {res.tokens} predicted tokens, "
              f"model at its own k={res.top_k}: {res.nll_base:.4f} nats/token")
    t = Table(title="top-k sweep: change against the model's own k (95% bootstrap CI over documents)")
    for col in ("scope", "k", "NLL", "delta NLL vs K", "delta vs k+1", "KL", "top-1 agreement"):
        t.add_column(col, justify="left" if col == "scope" else "right")
    for r in res.topk:
        t.add_row(r.scope, str(r.k), f"{r.nll:.4f}", _ci(r.delta_nll), _ci(r.step_delta_nll), _ci(r.kl, ".4f"),
                  _ci(r.top1_agreement, ".3f"))
    con.print(t)
    if res.degraded_positions:
        t = Table(title="positions that degrade most (all layers)")
        for col in ("k", "doc", "pos", "delta NLL", "context"):
            t.add_column(col, justify="left" if col == "context" else "right")
        for d in res.degraded_positions:
            t.add_row(str(d.k), str(d.doc), str(d.position), f"{d.delta_nll:+.3f}", escape(d.context))
        con.print(t)
    if res.pairs:
        t = Table(title="pair compatibility: one of a co-selected pair forced out vs a random replacement")
        for col in ("layer", "pair", "count", "expected", "delta NLL", "random", "pair - random", "control"):
            t.add_column(col, justify="right")
        for p in res.pairs:
            t.add_row(str(p.layer), f"E{p.experts[0]}+E{p.experts[1]}", str(p.count), f"{p.expected:.1f}",
                      _ci(p.delta_nll, "+.5f"), _ci(p.random_delta_nll, "+.5f"), _ci(p.compatibility, "+.5f"), p.control)
        con.print(t)


def _plot_interference(res, path: str) -> None:
    from lazarus_core.cli.analysis_common import save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for scope in dict.fromkeys(r.scope for r in res.topk):
        rows = [r for r in res.topk if r.scope == scope]
        ks = [r.k for r in rows]
        for ax, key in zip(axes, ("delta_nll", "kl", "top1_agreement")):
            ivs = [getattr(r, key) for r in rows]
            ax.errorbar(ks, [i.estimate for i in ivs], yerr=[[i.estimate - i.low for i in ivs],
                                                            [i.high - i.estimate for i in ivs]],
                        marker="o", capsize=3, label=scope, lw=2 if scope == "all" else 1)
    for ax, title in zip(axes, ("NLL change vs the model's k (nats/token)", "KL(model || at k)", "top-1 agreement")):
        ax.set_xlabel("experts per token k")
        ax.set_title(title)
    axes[0].axhline(0.0, color="k", lw=0.8)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------ expert-merging
def run_expert_merging(args: argparse.Namespace) -> int:
    """Expert similarity by weights, routing and outputs; merge candidates; real merges vs random pairs."""
    from lazarus_core.analysis.expert_interference import trace_windows
    from lazarus_core.analysis.expert_merging import expert_merging, merge_counts
    from lazarus_core.cli.analysis_common import write_csv_tables

    _positive(args.loss_documents, "--loss-documents")
    if args.random_repeats < 0:
        raise ValueError(f"--random-repeats must be >= 0, got {args.random_repeats}")
    _positive(args.output_rows, "--output-rows")
    session = Session(args)
    trace, layers = _trace_and_layers(args, session, logits=args.measure == "routing" or not args.trace,
                                      hidden_states=args.measure == "outputs" or not args.trace,
                                      sample_tokens=None if args.trace else args.output_rows)
    docs = trace.document_ids()
    held = docs[-min(args.loss_documents, max(len(docs) // 2, 1)):] if not args.no_loss and len(docs) > 1 else []
    documents = None
    if not args.no_loss:
        windows = [w for w in trace_windows(trace, max_documents=len(docs), max_tokens=len(trace.token_ids))
                   if w.doc in set(int(d) for d in held)]
        if not windows:
            raise ValueError("no held-out document has two tokens: raise --num-tokens or use --no-loss")
        documents = [w.ids for w in windows]
    bytes_per_expert = _stored_expert_bytes(session, layers)
    E = session.info.num_experts
    cap = sum(min(E // 2, E - session.info.layers[l].top_k) for l in layers)
    n_steps = 0 if args.no_loss else len(merge_counts(min(args.max_merges or cap, cap))) * (1 + args.random_repeats)
    with _progress(max(n_steps, 1), "expert-merging") as advance:
        res = expert_merging(session.model, trace, documents, threshold=args.threshold, measure=args.measure,
                             layers=layers, max_merges=args.max_merges, random_repeats=args.random_repeats,
                             bytes_per_expert=bytes_per_expert, max_output_rows=args.output_rows,
                             exclude_documents=[int(d) for d in held] if documents is not None else (),
                             info=session.info, seed=args.seed, progress=lambda: advance())
    _render_merging(res)
    write_csv_tables(args, res.tables())
    if args.plot:
        _plot_merging(res, args.plot)
    emit(args, {"action": "expert-merging", "model": session.model_name, **res.to_dict()})
    return 0


def _stored_expert_bytes(session, layers) -> dict[int, int] | None:
    """Bytes of one expert per layer as stored in the checkpoint (None when it cannot be opened)."""
    try:
        from lazarus_core.models import open_moe_checkpoint
        from lazarus_core.overlay.sizes import expert_bytes_as_stored

        with open_moe_checkpoint(session.spec) as ckpt:
            stored = expert_bytes_as_stored(ckpt)
            return {l: int(stored[l] // ckpt.num_experts) for l in layers if l in stored}
    except Exception:  # noqa: BLE001 - a model we cannot open as a checkpoint falls back to the loaded dtype
        return None


def _render_merging(res) -> None:
    from rich.table import Table

    con = console()
    con.print(f"[bold]expert merging[/bold]: {res.num_experts} experts, top-{res.top_k}; candidates by "
              f"'{res.measure}' >= {res.threshold:g}: {res.mergeable_share:.1%} of pairs")
    t = Table(title="similarity of expert pairs per layer (off-diagonal), next to a permutation null")
    for col in ("layer", "measure", "mean", "median", "q95", "max", "null q95", "independent", f">= {res.threshold:g}",
                "null >= T"):
        t.add_column(col, justify="right")
    for l, ds in res.distributions.items():
        for d in ds:
            t.add_row(str(l), d.measure, f"{d.mean:.3f}", f"{d.median:.3f}", f"{d.q95:.3f}", f"{d.max:.3f}",
                      f"{d.null_q95:.3f}", f"{d.independent_mean:.3f}", f"{d.above_threshold}/{d.pairs}",
                      f"{d.null_above_threshold:.1%}")
    con.print(t)
    t = Table(title="most similar pairs")
    measures = list(res.candidates[0].similarity) if res.candidates else []
    for col in ("layer", "pair", *measures, "candidate"):
        t.add_column(col, justify="right")
    for c in res.candidates[:10]:
        t.add_row(str(c.layer), f"E{c.experts[0]}+E{c.experts[1]}", *(f"{c.similarity[m]:.3f}" for m in measures),
                  "yes" if c.above_threshold else "no")
    con.print(t)
    if res.pareto:
        t = Table(title=f"merges (greedy by {res.measure}) vs random pairs: held-out loss, {res.documents} documents, "
                        f"base {res.nll_base:.4f} nats/token")
        for col in ("merges", "bytes saved", "delta NLL", "KL", "top-1", "random delta NLL", "random KL"):
            t.add_column(col, justify="right")
        for r in res.pareto:
            t.add_row(str(r.merges), f"{r.bytes_saved:,}", _ci(r.delta_nll), _ci(r.kl, ".4f"), f"{r.top1_agreement:.3f}",
                      _ci(r.random_delta_nll), _ci(r.random_kl, ".4f"))
        con.print(t)


def _plot_merging(res, path: str) -> None:
    import numpy as np

    from lazarus_core.cli.analysis_common import save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    for m in (res.candidates[0].similarity if res.candidates else {}):
        vals = np.array([c.similarity[m] for c in res.candidates])
        ax.hist(vals[np.isfinite(vals)], bins=40, alpha=0.5, label=m)
    ax.axvline(res.threshold, color="k", ls="--", lw=0.8, label="threshold")
    ax.set_title("pair similarity")
    ax.legend(fontsize=8)
    ax = axes[1]
    if res.pareto:
        x = [r.bytes_saved / 1e6 for r in res.pareto]
        for key, label in (("delta_nll", f"greedy by {res.measure}"), ("random_delta_nll", "random pairs")):
            ivs = [getattr(r, key) for r in res.pareto]
            ax.errorbar(x, [i.estimate for i in ivs], yerr=[[i.estimate - i.low for i in ivs],
                                                           [i.high - i.estimate for i in ivs]], marker="o", capsize=3,
                        label=label)
        for r, xi in zip(res.pareto, x):
            ax.annotate(str(r.merges), (xi, r.delta_nll.estimate), fontsize=7)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel("MB saved (experts removed annotated)")
        ax.set_ylabel("held-out NLL change (nats/token)")
        ax.legend()
    ax.set_title("Pareto: bytes saved vs loss increase")
    save_figure(fig, path)


# ------------------------------------------------------------------------------ routing-manipulation
def _manipulation_prompts(args, session) -> list[list[int]]:
    if args.prompt is not None:
        if not args.prompt or any(not p or not p.strip() for p in args.prompt):
            raise ValueError("the prompt is empty (-p)")
        return [session.encode(p)[: args.prompt_tokens] for p in args.prompt]
    from lazarus_core.cli.analysis_common import default_corpus

    corpus, _ = default_corpus(args, session)
    prompts = []
    for text in corpus.texts:
        if len(prompts) == args.trials:
            break
        if text.strip():
            ids = session.encode(text)[: args.prompt_tokens]
            if len(ids) >= 2:
                prompts.append(ids)
    if not prompts:
        raise ValueError("the corpus has no document with two tokens to use as a prompt")
    return prompts


def run_routing_manipulation(args: argparse.Namespace) -> int:
    """Search tokens that make an expert primary at a position (gradient vs random), and routing robustness."""
    from lazarus_core.analysis.routing_manipulation import routing_manipulation
    from lazarus_core.cli.analysis_common import write_csv_tables

    for value, flag in ((args.steps, "--steps"), (args.trials, "--trials"), (args.candidates, "--candidates"),
                        (args.prompt_tokens, "--prompt-tokens")):
        _positive(value, flag)
    noise = [float(x) for x in args.noise.split(",") if x.strip()] if args.noise else []
    if any(x < 0 for x in noise):
        raise ValueError(f"--noise ratios must be >= 0, got {args.noise}")
    session = Session(args)
    layer = choose_layers(args, sorted(session.info.layers), many=False)[0]
    E = session.info.layers[layer].num_experts
    if not 0 <= args.expert < E:
        raise ValueError(f"--expert {args.expert} is out of range: layer {layer} has {E} experts (0..{E - 1})")
    prompts = _manipulation_prompts(args, session)
    tok = session.tokenizer
    protected = [i for i in tok.all_special_ids if i != tok.unk_token_id]    # <unk> may be edited like a word
    total = len(prompts) * (1 + 2 * args.steps)
    with _progress(total, "routing-manipulation") as advance:
        res = routing_manipulation(session.model, prompts, layer, args.expert, target_idx=args.target_idx,
                                   steps=args.steps, candidates=args.candidates, topk_tokens=args.topk_tokens,
                                   edit_target=args.edit_target, protected_ids=protected,
                                   substitutions=args.substitutions, noise=noise, noise_draws=args.noise_draws,
                                   info=session.info, seed=args.seed, progress=lambda: advance())
    _render_manipulation(res, session)
    write_csv_tables(args, res.tables())
    if args.plot:
        _plot_manipulation(res, args.plot)
    emit(args, {"action": "routing-manipulation", "model": session.model_name, **res.to_dict()})
    return 0


def _render_manipulation(res, session) -> None:
    from rich.table import Table

    con = console()
    target = "the last position" if res.target_idx is None else f"position {res.target_idx}"
    con.print(f"[bold]routing manipulation[/bold]: make E{res.expert} primary at layer {res.layer}, {target}; "
              f"{res.prompts} prompts, E{res.expert} already primary in {res.already_primary} "
              f"({_ci(res.primary_share, '.1%')}; chance about {1 / res.num_experts:.1%})")
    t = Table(title=f"search: {res.steps} steps x {res.candidates} substitutions"
                    + (" (target token editable)" if res.edit_target else " (positions before the target)"))
    for col in ("method", "trials", "successes", "success rate [95% Wilson]", "mean edits", "mean steps", "margin gain"):
        t.add_column(col, justify="right")
    for s in (res.gradient, res.random):
        t.add_row(s.method, str(s.trials), str(s.successes), _ci(s.success_rate, ".1%"),
                  "-" if s.mean_edits is None else f"{s.mean_edits:.2f}",
                  "-" if s.mean_steps is None else f"{s.mean_steps:.2f}", f"{s.mean_margin_gain:+.3f}")
    con.print(t)
    if res.gradient_minus_random is not None:
        con.print(f"gradient minus random success (paired, per prompt): {_ci(res.gradient_minus_random, '+.1%')}")
    t = Table(title="robustness: primary expert at the target changes (95% bootstrap CI over prompts)")
    for col in ("perturbation", "noise / embedding norm", "draws", "flip rate"):
        t.add_column(col, justify="right")
    for f in res.flips:
        t.add_row(f.perturbation, "-" if f.noise_ratio is None else f"{f.noise_ratio:g}", str(f.draws),
                  _ci(f.rate, ".1%"))
    con.print(t)


def _plot_manipulation(res, path: str) -> None:
    from lazarus_core.cli.analysis_common import save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    rows = [s for s in (res.gradient, res.random) if s.success_rate is not None]
    ax.bar([s.method for s in rows], [s.success_rate.estimate for s in rows],
           yerr=[[s.success_rate.estimate - s.success_rate.low for s in rows],
                 [s.success_rate.high - s.success_rate.estimate for s in rows]], capsize=4)
    ax.set_ylim(0, 1)
    ax.set_title(f"L{res.layer} E{res.expert} made primary: success rate")
    ax = axes[1]
    noise = [f for f in res.flips if f.perturbation == "noise"]
    if noise:
        ax.errorbar([f.noise_ratio for f in noise], [f.rate.estimate for f in noise],
                    yerr=[[f.rate.estimate - f.rate.low for f in noise], [f.rate.high - f.rate.estimate for f in noise]],
                    marker="o", capsize=3, label="embedding noise")
    for f, ls in zip([f for f in res.flips if f.perturbation != "noise"], ("--", ":")):
        ax.axhline(f.rate.estimate, ls=ls, color="k", lw=0.8, label=f"random {f.perturbation} substitution")
    ax.set_xlabel("noise norm / embedding norm")
    ax.set_ylabel("flip rate of the primary expert")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------- register
def register(actions: argparse._SubParsersAction) -> None:
    """Add this module's actions to `introspect moe-expert`."""
    from lazarus_core.cli.analysis_common import add_analysis_flags

    p = actions.add_parser("expert-interference", help="loss, KL and top-1 agreement at k = 1..K; degraded inputs; "
                                                       "pair compatibility vs a random replacement")
    add_common(p, many_layers=True, classifier=False)
    add_analysis_flags(p, num_tokens=1024)
    p.add_argument("--k-values", default=None, metavar="K1,K2,...",
                   help="experts per token to measure (default 1..K, or powers of two when K > 8; K always)")
    p.add_argument("--documents", type=int, default=16, help="held-out documents measured (default 16)")
    p.add_argument("--pairs", type=int, default=3, help="most frequent co-selected pairs per layer (0: none)")
    p.add_argument("--no-per-layer", action="store_true", help="only all layers at once, not one layer at a time")
    p.add_argument("--top", type=int, default=5, help="degraded documents and positions listed per k")
    p.set_defaults(func=run_expert_interference)

    p = actions.add_parser("expert-merging", help="expert similarity (weights, routing, outputs); merge candidates; "
                                                  "real merges vs random pairs (Pareto)")
    add_common(p, many_layers=True, classifier=False)
    add_analysis_flags(p, num_tokens=1024)
    p.add_argument("-t", "--threshold", type=float, default=0.8, help="similarity of a merge candidate (default 0.8)")
    p.add_argument("--measure", default="weights", choices=("weights", "deltas", "routing", "outputs"),
                   help="similarity that ranks candidates and orders the greedy merges (default weights)")
    p.add_argument("--max-merges", type=int, default=None,
                   help="most merges in the Pareto table (default: every layer halved, never below its top-k)")
    p.add_argument("--random-repeats", type=int, default=2, help="random pair sets per number of merges (baseline)")
    p.add_argument("--loss-documents", type=int, default=8,
                   help="trace documents held out for the loss (the last ones; at most half the trace)")
    p.add_argument("--output-rows", type=int, default=256, help="sampled tokens of the output (CKA) similarity")
    p.add_argument("--no-loss", action="store_true", help="similarity and candidates only (no merges)")
    p.set_defaults(func=run_expert_merging)

    p = actions.add_parser("routing-manipulation", help="search tokens that make an expert primary (gradient vs "
                                                        "random); routing flip rate under substitutions and noise")
    add_common(p, many_layers=False, trace=False, model_required=True, classifier=False)
    add_analysis_flags(p)
    p.add_argument("--expert", type=int, required=True, help="the expert to make primary")
    p.add_argument("-p", "--prompt", action="append", default=None,
                   help="a prompt (repeatable; default: the first --trials held-out documents)")
    p.add_argument("--target-idx", type=int, default=None, metavar="POS",
                   help="target position (negative from the end; default the last)")
    p.add_argument("--steps", type=int, default=10, help="search steps per prompt (default 10)")
    p.add_argument("--candidates", type=int, default=32, help="substitutions evaluated per step (default 32)")
    p.add_argument("--topk-tokens", type=int, default=32, help="gradient-ranked tokens kept per position (default 32)")
    p.add_argument("--trials", type=int, default=16, help="prompts taken from the corpus without -p (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens kept of each prompt (default 16)")
    p.add_argument("--edit-target", action="store_true", help="also substitute the target's own token")
    p.add_argument("--substitutions", type=int, default=32, help="random single substitutions per prompt (robustness)")
    p.add_argument("--noise", default="0,0.05,0.1,0.2,0.5,1", metavar="R1,R2,...",
                   help="embedding-noise norms as multiples of each embedding's norm")
    p.add_argument("--noise-draws", type=int, default=8, help="noise draws per prompt and norm")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_routing_manipulation)
