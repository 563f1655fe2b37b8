"""Actions cold-experts, expert-circuits, generation-dynamics of the dynamics study (thin CLI over the library analyses)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit


@contextlib.contextmanager
def _progress(total: int | None = None):
    """Yields ``step(description)``: a transient rich progress bar (a spinner when ``total`` is unknown)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = ([SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()] if total is None else
               [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()])
    with Progress(*columns, transient=True, console=console()) as bar:
        task = bar.add_task("", total=total)

        def step(description: str | None = None, advance: int = 1) -> None:
            bar.update(task, description=description or "", advance=advance)

        yield step


def _trace_and_layers(args, session, *, logits: bool):
    """The analysis trace (``--trace`` or a fresh capture of the chosen layers) and the chosen layers."""
    from lazarus_core.cli.analysis_common import analysis_trace

    if args.trace:
        trace, labels = analysis_trace(args, session)
        return trace, labels, choose_layers(args, trace.layers, many=True)
    layers = choose_layers(args, sorted(session.info.layers), many=True)
    trace, labels = analysis_trace(args, session, logits=logits, layers=layers)
    return trace, labels, layers


# -------------------------------------------------------------------------------------- cold-experts
def run_cold_experts(args: argparse.Namespace) -> int:
    """Activation distribution per layer, cold experts, their triggers and ablation cost against random non-cold experts."""
    from lazarus_core.analysis.cold_experts import cold_experts
    from lazarus_core.cli.analysis_common import write_csv_tables

    if args.tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0 (nats/token), got {args.tolerance}")
    session = Session(args)
    trace, _labels, layers = _trace_and_layers(args, session, logits=True)
    model = None if args.no_loss else session.model
    with _progress() as step:
        step("ablating cold experts", advance=0)
        res = cold_experts(trace, layers=layers, threshold=args.threshold, tolerance=args.tolerance, model=model,
                           tokenizer=session.tokenizer, classifier=session.classifier, view=args.view, top=args.top,
                           min_count=args.min_count, contexts=args.contexts, loss_documents=args.loss_documents,
                           baseline_draws=args.baseline_draws, seed=args.seed, progress=step)
    _render_cold(res)
    write_csv_tables(args, res.tables())
    if args.plot:
        _plot_cold(res, args.plot)
    emit(args, {"action": "cold-experts", "model": session.spec, **res.to_dict()})
    return 0


def _fmt_delta(a) -> str:
    d = a.delta_nll
    return f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"


def _render_cold(res) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = console()
    d = res.to_dict()
    con.print(f"[bold]cold experts[/bold]: share of routing slots < {res.threshold:.4f} (uniform 1/E = "
              f"{1 / res.num_experts:.4f}) over {res.tokens} tokens: {res.num_cold} of "
              f"{res.num_experts * len(res.layers)} ({d['cold_fraction']:.1%}); uniform routing would give "
              f"{d['expected_cold_uniform']:.2f}")
    t = Table(title="activation distribution per layer")
    for col in ("layer", "min share", "max share", "effective experts", "gini", "cold", "expected cold (uniform)"):
        t.add_column(col, justify="right")
    for l in res.layers:
        t.add_row(str(l.layer), f"{min(l.shares):.4f}", f"{max(l.shares):.4f}",
                  f"{l.effective_experts:.1f} / {res.num_experts}", f"{l.gini:.3f}", str(len(l.cold_experts)),
                  f"{l.expected_cold_uniform:.2f}")
    con.print(t)
    if not res.num_cold:
        return
    t = Table(title=f"cold experts (ablation: held-out loss change, nats/token, 95% CI over documents; "
                    f"prunable when the CI's upper end <= {res.tolerance:g})")
    for col in ("layer", "expert", "share [95% CI]", "top tokens (lift)", "highest-logit context", "ablation",
                "prunable"):
        t.add_column(col, justify="left" if col in ("top tokens (lift)", "highest-logit context") else "right")
    for l in res.layers:
        for c in l.cold_experts:
            toks = ", ".join(f"{r.key} x{r.lift:.1f}" for r in c.top_tokens[:3]) or "-"
            ctx = c.top_logit_contexts[0].context if c.top_logit_contexts else "-"
            t.add_row(str(l.layer), f"E{c.expert}", f"{c.share:.4f} [{c.share_ci.low:.4f}, {c.share_ci.high:.4f}]",
                      escape(toks), escape(ctx[:60]), _fmt_delta(c.ablation) if c.ablation else "-",
                      ("yes" if c.ablation.prunable else "no") if c.ablation else "-")
    con.print(t)
    for l in res.layers:
        if l.random_single and len(l.cold_experts) > 1:
            con.print(f"layer {l.layer}: one random non-cold expert ablated (control of each cold expert): "
                      + "; ".join(_fmt_delta(a) for a in l.random_single))
        if l.all_cold is not None:
            ctrl = "; ".join(_fmt_delta(a) for a in l.random_control) or "none"
            con.print(f"layer {l.layer}: all {len(l.cold_experts)} cold experts ablated {_fmt_delta(l.all_cold)}; "
                      f"as many random non-cold experts: {ctrl}")
        elif l.skipped:
            con.print(f"layer {l.layer}: {l.skipped}")
    if res.prune_all is not None:
        ctrl = "; ".join(_fmt_delta(a) for a in res.prune_all_random) or "none"
        con.print(f"[bold]every cold expert of the model at once[/bold] (base loss {res.nll_base:.4f}): "
                  f"{_fmt_delta(res.prune_all)} ({'prunable' if res.prune_all.prunable else 'not prunable'}); "
                  f"as many random non-cold experts per layer: {ctrl}")
    con.print(f"prunable cold experts: {res.num_prunable} of {res.num_cold}")


def _plot_cold(res, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lazarus_core.cli.analysis_common import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    for l in res.layers:
        ax.plot(np.arange(res.num_experts), np.sort(l.shares)[::-1], lw=1, label=f"L{l.layer}")
    ax.axhline(1 / res.num_experts, color="k", lw=0.8, ls="--", label="uniform 1/E")
    ax.axhline(res.threshold, color="r", lw=0.8, ls=":", label="cold threshold")
    ax.set_yscale("symlog", linthresh=res.threshold / 10)
    ax.set_xlabel("expert rank")
    ax.set_ylabel("share of routing slots")
    ax.set_title("activation frequency distribution")
    if len(res.layers) <= 12:
        ax.legend(fontsize=7)
    ax = axes[1]
    rows = [(f"L{l.layer}E{c.expert}", c.ablation.delta_nll) for l in res.layers for c in l.cold_experts if c.ablation]
    rows += [(f"L{l.layer} random x{len(l.cold_experts)}", a.delta_nll) for l in res.layers for a in l.random_control]
    rows += [(f"L{l.layer} random x1", a.delta_nll) for l in res.layers for a in l.random_single
             if len(l.cold_experts) > 1]
    if rows:
        y = np.arange(len(rows))
        est = np.array([r[1].estimate for r in rows])
        err = np.array([[r[1].estimate - r[1].low for r in rows], [r[1].high - r[1].estimate for r in rows]])
        ax.errorbar(est, y, xerr=err, fmt="o")
        ax.set_yticks(y, [r[0] for r in rows])
        ax.axvline(res.tolerance, color="r", ls=":", lw=0.8, label="tolerance")
        ax.axvline(0, color="k", lw=0.8)
        ax.legend()
    ax.set_xlabel("held-out loss change (nats/token)")
    ax.set_title("ablation: cold experts vs random non-cold")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------- expert-circuits
def _parse_hop(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        layer, expert = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--through expects LAYER:EXPERT, got {text!r}") from None
    return layer, expert


def run_expert_circuits(args: argparse.Namespace) -> int:
    """Chains of (layer, expert) over consecutive MoE layers against independence, with a permuted control."""
    from lazarus_core.analysis.expert_circuits import expert_circuits
    from lazarus_core.cli.analysis_common import write_csv_tables

    through = _parse_hop(args.through)
    session = Session(args)
    trace, labels, layers = _trace_and_layers(args, session, logits=False)
    with _progress() as step:
        step(f"counting chains of length {args.length} over {len(layers)} layers", advance=0)
        res = expert_circuits(trace, layers=layers, length=args.length, alpha=args.alpha, top=args.top,
                              min_count=args.min_count, permuted_control=not args.no_permuted_control, seed=args.seed,
                              tokenizer=session.tokenizer, classifier=session.classifier, doc_labels=labels,
                              view=args.view, through=through)
    _render_circuits(res)
    write_csv_tables(args, res.tables())
    if args.plot:
        _plot_circuits(res, args.plot)
    emit(args, {"action": "expert-circuits", "model": session.spec, **res.to_dict()})
    return 0


def _render_circuits(res) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = console()
    perm = "not run" if res.significant_permuted is None else str(res.significant_permuted)
    con.print(f"[bold]expert circuits[/bold] of length {res.length} over windows {res.windows}: {res.tests} chains "
              f"tested on {res.tokens} tokens; {res.significant} over-represented at FDR {res.alpha:g} "
              f"(about {res.alpha * res.significant:.1f} of them false); permuted control (rows shuffled per "
              f"layer): {perm}")
    if not res.circuits:
        return
    t = Table(title="circuits (expected: independence across layers given each layer's loads)")
    cols = ["path", "count", "expected", "lift", "consistency [95% CI]", "if independent", "q"]
    if res.length == 3:
        cols.insert(3, "markov expected")
    cols.append("serves (lift)")
    for col in cols:
        t.add_column(col, justify="left" if col in ("path", "serves (lift)") else "right")
    for c in res.circuits:
        row = [" -> ".join(f"L{l}:E{e}" for l, e in c.path), str(c.count), f"{c.expected:.1f}", f"{c.lift:.2f}",
               f"{c.consistency:.1%} [{c.consistency_ci.low:.1%}, {c.consistency_ci.high:.1%}]",
               f"{c.consistency_baseline:.1%}", f"{c.q_value:.2g}"]
        if res.length == 3:
            row.insert(3, f"{c.markov_expected:.1f}")
        row.append(escape(", ".join(f"{s.key} x{s.lift:.1f}" for s in c.serves[:4])))
        t.add_row(*row)
    con.print(t)


def _plot_circuits(res, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lazarus_core.cli.analysis_common import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    rows = res.circuits[:25]
    names = [" > ".join(f"L{l}E{e}" for l, e in c.path) for c in rows]
    ax.bar(range(len(rows)), [c.count for c in rows], label="observed")
    ax.plot(range(len(rows)), [c.expected for c in rows], "k_", ms=12, label="expected (independent)")
    ax.set_xticks(range(len(rows)), names, rotation=70, fontsize=7)
    ax.set_ylabel("tokens")
    ax.legend()
    ax.set_title(f"top circuits (length {res.length})")
    ax = axes[1]
    ax.bar(["trace", "permuted"], [res.significant, res.significant_permuted or 0])
    ax.set_title(f"significant chains (FDR {res.alpha:g})")
    save_figure(fig, path)


# ------------------------------------------------------------------------------- generation-dynamics
def read_prompts_file(path: str) -> tuple[list[str], list[str | None]]:
    """``--prompts FILE``: JSONL records with ``prompt`` and optional ``answer`` -> (prompts, answers)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    prompts, answers = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"--prompts {path}: line {n} is not JSON") from None
        if not isinstance(record, dict) or not str(record.get("prompt", "")).strip():
            raise ValueError(f"--prompts {path}: line {n} has no non-empty \"prompt\"")
        prompts.append(str(record["prompt"]))
        answers.append(None if record.get("answer") is None else str(record["answer"]))
    if not prompts:
        raise ValueError(f"--prompts {path}: the file holds no prompts")
    return prompts, answers


def run_generation_dynamics(args: argparse.Namespace) -> int:
    """Routing of every generated token: step-to-step Jaccard, handoffs, phase changes, correct vs incorrect."""
    from lazarus_core.analysis.generation_dynamics import DEFAULT_PROMPTS, generation_dynamics
    from lazarus_core.cli.analysis_common import write_csv_tables

    prompts, answers = [], []
    if args.prompt is not None:
        if any(not p.strip() for p in args.prompt):
            raise ValueError("--prompt: a prompt is empty")
        prompts += list(args.prompt)
        answers += [None] * len(args.prompt)
    if args.prompts:
        more, more_answers = read_prompts_file(args.prompts)
        prompts += more
        answers += more_answers
    if not prompts:
        prompts, answers = list(DEFAULT_PROMPTS), [None] * len(DEFAULT_PROMPTS)
    if args.permutations < 1:
        raise ValueError(f"--permutations must be at least 1, got {args.permutations}")
    session = Session(args)
    layers = choose_layers(args, sorted(session.info.layers), many=True)
    with _progress(len(prompts)) as step:
        step("generating", advance=0)
        res = generation_dynamics(session.model, session.tokenizer, prompts, answers=answers, layers=layers,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                  permutations=args.permutations, match=args.match, info=session.info,
                                  progress=lambda i: step(f"generated {i + 1} of {len(prompts)}"))
    _render_generation(res)
    write_csv_tables(args, res.tables())
    if args.plot:
        _plot_generation(res, args.plot)
    emit(args, {"action": "generation-dynamics", "model": session.spec, **res.to_dict()})
    return 0


def _render_generation(res) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = console()
    mode = "greedy" if res.temperature == 0 else f"sampled at temperature {res.temperature:g}, seed {res.seed}"
    con.print(f"[bold]generation dynamics[/bold]: {len(res.generations)} generations ({mode}), "
              f"{res.permutations} shuffles of the steps per baseline")
    for g in res.generations[:8]:
        mark = "" if g.correct is None else (" [green]correct[/green]" if g.correct else " [red]incorrect[/red]")
        con.print(f"  [bold]{escape(g.prompt)}[/bold]{escape(g.text)}  ({g.steps} steps){mark}")
    if res.accuracy is not None:
        a = res.accuracy
        con.print(f"accuracy {a.estimate:.1%} [{a.low:.1%}, {a.high:.1%}] over {a.n_units} answered prompts")
    t = Table(title="per layer: consecutive-step top-k Jaccard vs shuffled steps; primary-expert handoffs vs "
                    "independence; share of generations with a phase change")
    for col in ("layer", "steps", "Jaccard [95% CI]", "shuffled [2.5, 97.5%]", "p", "self-handoff", "expected",
                "handoff p", "phase change", "correct vs incorrect (L1, p)"):
        t.add_column(col, justify="right")
    for l in res.layers:
        jac = f"{l.jaccard.estimate:.3f} [{l.jaccard.low:.3f}, {l.jaccard.high:.3f}]" if l.jaccard else "-"
        sh = l.jaccard_shuffled
        shuf = f"{sh['mean']:.3f} [{sh['low']:.3f}, {sh['high']:.3f}]" if sh else "-"
        corr = "-"
        if l.correctness and l.correctness.get("p_value") is not None:
            corr = f"{l.correctness['load_l1_difference']:.3f}, p={l.correctness['p_value']:.3f}"
        t.add_row(str(l.layer), str(l.transitions), jac, shuf, "-" if l.jaccard_p is None else f"{l.jaccard_p:.3f}",
                  f"{l.self_handoff:.1%}", f"{l.self_handoff_expected:.1%}",
                  "-" if l.handoff_p is None else f"{l.handoff_p:.3f}",
                  "-" if l.phase_detected_share is None else f"{l.phase_detected_share:.0%} (chance {1 - res.level:.0%})",
                  corr)
    con.print(t)


def _plot_generation(res, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lazarus_core.analysis.generation_dynamics import step_jaccard
    from lazarus_core.cli.analysis_common import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    ax = axes[0]
    lays = [l for l in res.layers if l.jaccard is not None]
    x = np.arange(len(lays))
    ax.errorbar(x - 0.1, [l.jaccard.estimate for l in lays],
                yerr=[[l.jaccard.estimate - l.jaccard.low for l in lays], [l.jaccard.high - l.jaccard.estimate for l in lays]],
                fmt="o", label="consecutive steps")
    ax.errorbar(x + 0.1, [l.jaccard_shuffled["mean"] for l in lays],
                yerr=[[l.jaccard_shuffled["mean"] - l.jaccard_shuffled["low"] for l in lays],
                      [l.jaccard_shuffled["high"] - l.jaccard_shuffled["mean"] for l in lays]], fmt="s",
                label="steps shuffled")
    ax.set_xticks(x, [f"L{l.layer}" for l in lays])
    ax.set_ylabel("top-k Jaccard")
    ax.legend()
    ax.set_title("routing stability during generation")
    ax = axes[1]
    g = max(res.generations, key=lambda g: g.steps)
    for l in res.layers[:6]:
        ax.plot(step_jaccard(g.routing[l.layer], res.num_experts), lw=1, label=f"L{l.layer}")
        cp = l.phases[res.generations.index(g)]["usage"]
        if cp is not None and cp.detected:
            ax.axvline(cp.location - 0.5, ls=":", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("Jaccard with the next step")
    ax.set_title("longest generation (dotted: detected usage change)")
    ax.legend(fontsize=7)
    ax = axes[2]
    mid = res.layers[len(res.layers) // 2]
    h, e = np.asarray(mid.handoff, float), np.asarray(mid.handoff_expected, float)
    im = ax.imshow(np.divide(h, e, out=np.zeros_like(h), where=e > 0), cmap="viridis")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel("primary expert at t + 1")
    ax.set_ylabel("primary expert at t")
    ax.set_title(f"L{mid.layer} handoffs: observed / expected")
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------ register
def register(actions: argparse._SubParsersAction) -> None:
    """Add this module's actions to `introspect moe-expert`."""
    from lazarus_core.cli.analysis_common import add_analysis_flags

    p = actions.add_parser("cold-experts", help="rarely used experts: activation distribution, triggers, ablation "
                                                "cost vs random non-cold experts, prunability")
    add_common(p, many_layers=True)
    add_analysis_flags(p)
    p.add_argument("--threshold", type=float, default=None,
                   help="cold: share of the layer's routing slots below this (default 1/(4E), a quarter of uniform)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="prunable: the ablation's 95%% CI upper end is at most this loss increase (nats/token; "
                        "default 0.01)")
    p.add_argument("--top", type=int, default=5, help="trigger tokens / trigrams listed per cold expert")
    p.add_argument("--min-count", type=int, default=2, help="fewest occurrences of a trigger token or trigram")
    p.add_argument("--contexts", type=int, default=3, help="highest-logit contexts per cold expert")
    p.add_argument("--loss-documents", type=int, default=16, help="held-out documents of the ablation loss")
    p.add_argument("--baseline-draws", type=int, default=2,
                   help="random non-cold sets ablated per layer and for the whole model (the control)")
    p.add_argument("--no-loss", action="store_true", help="skip every ablation (no model forward passes)")
    p.set_defaults(func=run_cold_experts)

    p = actions.add_parser("expert-circuits", help="chains of (layer, expert) over consecutive MoE layers against "
                                                   "independence, with a permuted control")
    add_common(p, many_layers=True)
    add_analysis_flags(p)
    p.add_argument("--length", type=int, choices=(2, 3), default=2, help="hops per chain (default 2)")
    p.add_argument("--alpha", type=float, default=0.05, help="false-discovery rate (Benjamini-Hochberg)")
    p.add_argument("--top", type=int, default=30, help="most circuits listed")
    p.add_argument("--min-count", type=int, default=5, help="fewest tokens for a circuit to be listed")
    p.add_argument("--through", default=None, metavar="LAYER:EXPERT", help="list only circuits through this hop")
    p.add_argument("--no-permuted-control", action="store_true",
                   help="skip the control run on the trace with each layer's rows permuted")
    p.set_defaults(func=run_expert_circuits)

    p = actions.add_parser("generation-dynamics", help="routing of every generated token: step-to-step Jaccard, "
                                                       "handoffs, phase changes, correct vs incorrect")
    add_common(p, many_layers=True, trace=False, model_required=True, classifier=False)
    p.add_argument("-p", "--prompt", action="append", default=None,
                   help="a prompt (repeatable; default: a few built-in prompts)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="JSONL file: one record per line with \"prompt\" and optional \"answer\"")
    p.add_argument("--max-new-tokens", type=int, default=24, help="generation steps per prompt (default 24)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: seeded sampling")
    p.add_argument("--match", choices=("prefix", "contains"), default="prefix",
                   help="a generation is correct when its answer starts it (prefix) or occurs in it (contains)")
    p.add_argument("--permutations", type=int, default=200, help="shuffles of the steps per baseline")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and the permutations")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a figure (.png or .pdf)")
    p.add_argument("--csv", default=None, metavar="DIR", help="write the per-layer and per-step tables as CSV")
    p.set_defaults(func=run_generation_dynamics)
