"""Actions router-entropy, router-distributions, router-metrics (thin CLI over the library analyses)."""

from __future__ import annotations

import argparse

import numpy as np

from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit


def _ci(iv, fmt: str = ".3f") -> str:
    return f"{iv.estimate:{fmt}} [{iv.low:{fmt}}, {iv.high:{fmt}}]"


def _trace_and_layers(args: argparse.Namespace, *, logits: bool):
    """The trace (``--trace`` or captured now, only the chosen layers) and the layers to analyse."""
    from lazarus_core.cli.analysis_common import analysis_trace

    session = Session(args)
    capture_layers = None if args.trace else choose_layers(args, sorted(session.info.layers), many=True)
    trace, labels = analysis_trace(args, session, logits=logits, layers=capture_layers)
    layers = choose_layers(args, trace.layers, many=True)
    return session, trace, labels, layers


def _source(args: argparse.Namespace, session: Session, trace) -> dict:
    return {"model": session.model_name, "trace": str(trace.path) if args.trace else None}


def _histogram_rows(layer: int, view: str, hist) -> list[dict]:
    return [{"layer": layer, "view": view, "bin_low": lo, "bin_high": hi, "count": c}
            for lo, hi, c in zip(hist.edges[:-1], hist.edges[1:], hist.counts)]


def _common_flags(p: argparse.ArgumentParser) -> None:
    from lazarus_core.cli.analysis_common import add_analysis_flags

    add_common(p, many_layers=True, classifier=False)
    add_analysis_flags(p)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates over documents (default 1000)")


# -------------------------------------------------------------------------------------- router-entropy
def run_router_entropy(args: argparse.Namespace) -> int:
    """Per-token router entropy (family convention) and top-k weight entropy per layer, against marginal and log E."""
    from rich.table import Table

    from lazarus_core.analysis.router_entropy import router_entropy
    from lazarus_core.cli.analysis_common import write_csv_tables

    session, trace, _, layers = _trace_and_layers(args, logits=True)
    res = router_entropy(trace, layers, bins=args.bins, n_boot=args.n_boot, seed=args.seed, keep_tokens=bool(args.csv))
    t = Table(title=f"router entropy ({res.family}, {res.scoring}; {res.num_tokens} tokens, nats, "
                    "95% CI over documents)")
    for col in ("layer", "mean H [95% CI]", "÷log E", "median", "marginal", "log E", "MI", "top-k ÷log k"):
        t.add_column(col, justify="right")
    for e in res.layers:
        t.add_row(str(e.layer), _ci(e.router.mean_nats), f"{e.router.mean_normalized:.3f}",
                  f"{e.router.quantiles[0.5]:.3f}", f"{e.marginal_entropy_nats:.3f}", f"{e.max_entropy_nats:.3f}",
                  f"{e.mutual_information_nats:.3f}", f"{e.topk.mean_normalized:.3f}")
    con = console()
    con.print(t)
    con.print("baselines: log E = a uniform router; marginal = entropy of the layer's mean routing distribution; "
              "MI = marginal - mean H (0: routing does not depend on the token)")
    if args.csv:
        tables = {"router_entropy_layers": [
            {k: v for k, v in e.to_dict().items() if not isinstance(v, (dict, list))} for e in res.layers],
            "router_entropy_histograms": [row for e in res.layers for view, h in
                                          (("router", e.router.histogram), ("topk", e.topk.histogram))
                                          for row in _histogram_rows(e.layer, view, h)]}
        doc, pos, tok = trace.doc_ids.tolist(), trace.positions.tolist(), trace.token_ids.tolist()
        columns = {}
        for layer, (router, topk) in res.token_entropy.items():
            columns[f"entropy_nats_L{layer}"] = router.tolist()
            columns[f"topk_entropy_nats_L{layer}"] = topk.tolist()
        tables["router_entropy_tokens"] = [
            {"token": i, "doc_id": doc[i], "position": pos[i], "token_id": tok[i],
             **{name: values[i] for name, values in columns.items()}} for i in range(len(tok))]
        write_csv_tables(args, tables)
    if args.plot:
        _plot_entropy(res, args.plot)
    emit(args, {"action": "router-entropy", **_source(args, session, trace), **res.to_dict()})
    return 0


def _plot_entropy(res, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lazarus_core.cli.analysis_common import save_figure

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = [e.layer for e in res.layers]
    mean = np.array([e.mean_entropy_nats for e in res.layers])
    err = np.array([[e.mean_entropy_nats - e.router.mean_nats.low, e.router.mean_nats.high - e.mean_entropy_nats]
                    for e in res.layers]).T
    ax1.errorbar(x, mean, yerr=err, marker="o", label="mean per-token entropy")
    ax1.plot(x, [e.marginal_entropy_nats for e in res.layers], "s--", label="marginal (mean distribution)")
    ax1.plot(x, [e.max_entropy_nats for e in res.layers], ":", color="grey", label="log E (uniform)")
    ax1.set(xlabel="layer", ylabel="nats", title="router entropy")
    ax1.legend(fontsize=8)
    for e in res.layers:
        h = e.router.histogram
        centres = (np.array(h.edges[:-1]) + np.array(h.edges[1:])) / 2 / e.max_entropy_nats
        total = max(sum(h.counts), 1)
        ax2.plot(centres, np.array(h.counts) / total, label=f"L{e.layer}")
    ax2.set(xlabel="entropy / log E", ylabel="share of tokens", title="per-token entropy")
    ax2.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


# -------------------------------------------------------------------------------- router-distributions
def run_router_distributions(args: argparse.Namespace) -> int:
    """Histograms of raw logits, probabilities and renormalised top-k weights; mean probability per top-k slot."""
    from rich.table import Table

    from lazarus_core.analysis.router_distributions import router_distributions
    from lazarus_core.cli.analysis_common import write_csv_tables

    session, trace, _, layers = _trace_and_layers(args, logits=True)
    res = router_distributions(trace, layers, bins=args.bins, n_boot=args.n_boot, seed=args.seed,
                               sample_tokens=args.num_tokens if args.trace else None)
    k, e_count = trace.top_k, trace.num_experts
    shown = min(k, 4)
    t = Table(title=f"router distributions ({res.family}, {res.scoring}; {res.num_tokens} tokens)")
    for col in ("layer", "logits mean ± std [min, max]", f"p(slot 0..{shown - 1}) vs 1/E={1 / e_count:.3f}",
                f"top-k mass [95% CI] vs k/E={k / e_count:.3f}", f"renorm. w(slot 0..{shown - 1}) vs 1/k={1 / k:.3f}"):
        t.add_column(col, justify="right")
    for d in res.layers:
        spread = f"{d.logit_mean:.2f} ± {d.logit_std:.2f} [{d.logits.edges[0]:.1f}, {d.logits.edges[-1]:.1f}]"
        t.add_row(str(d.layer), spread,
                  " ".join(f"{i.estimate:.3f}" for i in d.probability_per_rank[:shown]), _ci(d.topk_mass),
                  " ".join(f"{i.estimate:.3f}" for i in d.topk_weight_per_rank[:shown]))
    console().print(t)
    if args.csv:
        write_csv_tables(args, {
            "router_distributions_histograms": [row for d in res.layers for view, h in
                                                (("logits", d.logits), ("probabilities", d.probabilities),
                                                 ("log10_probabilities", d.log10_probabilities),
                                                 ("topk_probabilities", d.topk_probabilities))
                                                for row in _histogram_rows(d.layer, view, h)],
            "router_distributions_slots": [
                {"layer": d.layer, "slot": r, "mean_probability": p.estimate, "probability_ci_low": p.low,
                 "probability_ci_high": p.high, "mean_topk_weight": w.estimate, "topk_weight_ci_low": w.low,
                 "topk_weight_ci_high": w.high, "uniform_probability": 1 / d.num_experts,
                 "uniform_topk_weight": 1 / d.top_k}
                for d in res.layers for r, (p, w) in enumerate(zip(d.probability_per_rank, d.topk_weight_per_rank))]})
    if args.plot:
        _plot_distributions(res, args.plot)
    emit(args, {"action": "router-distributions", **_source(args, session, trace), **res.to_dict()})
    return 0


def _plot_distributions(res, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lazarus_core.cli.analysis_common import save_figure

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for d in res.layers:
        for ax, h in zip(axes[:3], (d.logits, d.log10_probabilities, d.topk_probabilities)):
            centres = (np.array(h.edges[:-1]) + np.array(h.edges[1:])) / 2
            ax.plot(centres, np.array(h.counts) / max(sum(h.counts), 1), label=f"L{d.layer}")
        axes[3].plot(range(d.top_k), [i.estimate for i in d.probability_per_rank], "o-", label=f"L{d.layer}")
    first = res.layers[0]
    axes[1].axvline(np.log10(1 / first.num_experts), color="grey", ls=":", label="1/E")
    axes[2].axvline(1 / first.top_k, color="grey", ls=":", label="1/k")
    axes[3].axhline(1 / first.num_experts, color="grey", ls=":", label="1/E")
    for ax, title, xlabel in zip(axes, ("raw logits", "probabilities (log10)", "renormalised top-k weights",
                                        "mean probability per top-k slot"),
                                 ("logit", "log10 p", "weight / sum of top-k", "slot")):
        ax.set(title=title, xlabel=xlabel)
    axes[0].legend(fontsize=7, ncol=2)
    axes[3].legend(fontsize=7)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------ router-metrics
def run_router_metrics(args: argparse.Namespace) -> int:
    """Selection frequency, domain and vocabulary specialisation, token overlap, co-activation, saturation."""
    from rich.markup import escape
    from rich.table import Table

    from lazarus_core.analysis.router_metrics import router_metrics
    from lazarus_core.cli.analysis_common import write_csv_tables
    from lazarus_core.routing.trace_reader import load_trace

    if args.min_count < 1:
        raise ValueError(f"--min-count must be at least 1, got {args.min_count}")
    session, trace, labels, layers = _trace_and_layers(args, logits=False)
    compare = load_trace(args.compare_trace, verify=args.verify) if args.compare_trace else None
    if compare is not None:
        missing = [l for l in layers if l not in compare.layers]
        if missing:
            raise ValueError(f"--compare-trace {args.compare_trace} lacks layers {missing}: "
                             f"its layers are {compare.layers}")
    res = router_metrics(trace, layers, doc_labels=labels, compare=compare, min_count=args.min_count,
                         n_perm=args.permutations, n_boot=args.n_boot, seed=args.seed)
    k, e_count = trace.top_k, trace.num_experts
    t = Table(title=f"router metrics ({res.family}; {res.num_tokens} tokens, top-{k} of {e_count}; "
                    f"value vs chance baseline)")
    cols = ["layer", f"selection max/min ÷ k/E", f"vocab. spec. [95% CI] vs null (min count {args.min_count})",
            "token overlap vs null", "co-activation (best partner) vs random order / independent"]
    if compare is not None:
        cols += ["saturation [95% CI] vs independent", "top-1 agreement vs independent"]
    for col in cols:
        t.add_column(col, justify="right")
    for m in res.layers:
        sel = m.selection.any_slot / (k / e_count)
        v = m.vocabulary
        vocab = "-" if v.value is None else f"{_ci(v.value)} vs {v.null_mean:.3f}"
        co = m.coactivation.to_dict()
        row = [str(m.layer), f"{sel.max():.2f} / {sel.min():.2f}", vocab,
               "-" if m.token_overlap is None else f"{m.token_overlap.mean:.3f} vs {m.token_overlap.null_mean:.3f}",
               f"{co['coactivation_max_mean'] or 0:.3f} vs {co['coactivation_max_mean_baseline'] or 0:.3f} / "
               f"{co['coactivation_max_mean_independent'] or 0:.3f}"]
        if m.saturation is not None:
            s = m.saturation
            row += [f"{_ci(s.topk)} vs {s.topk_baseline:.3f}", f"{s.top1.estimate:.3f} vs {s.top1_baseline:.3f}"]
        t.add_row(*row)
    con = console()
    con.print(t)
    if any(m.domains for m in res.layers):
        dt = Table(title="domain specialisation (share of the domain's tokens routed to an expert ÷ k/E; "
                         "null: document labels permuted)")
        for col in ("layer", "domain", "tokens", "top experts", "max", "null max", "p"):
            dt.add_column(col, justify="left" if col == "domain" else "right")
        for m in res.layers:
            for d in m.domains:
                top = np.argsort(-d.specialisation)[:2]
                dt.add_row(str(m.layer), escape(d.label), str(d.num_tokens),
                           ", ".join(f"E{e} {d.specialisation[e]:.2f}" for e in top), f"{d.max_specialisation:.2f}",
                           f"{d.max_specialisation_null:.2f}", f"{d.p_value:.3f}")
        con.print(dt)
    elif not labels:
        con.print("domain specialisation: the documents carry no labels (a JSONL corpus with --label-field, or a "
                  "trace with lazarus_labels.json)")
    if args.csv:
        write_csv_tables(args, _metrics_tables(res))
    if args.plot:
        _plot_metrics(res, args.plot)
    emit(args, {"action": "router-metrics", **_source(args, session, trace), **res.to_dict()})
    return 0


def _metrics_tables(res) -> dict[str, list[dict]]:
    tables: dict[str, list[dict]] = {"router_metrics_layers": [], "router_metrics_experts": [],
                                     "router_metrics_domains": [], "router_metrics_pairs": []}
    for m in res.layers:
        flat = {k: v for k, v in m.to_dict().items() if not isinstance(v, (dict, list))}
        tables["router_metrics_layers"].append(flat)
        s = m.selection
        for e in range(m.num_experts):
            tables["router_metrics_experts"].append({
                "layer": m.layer, "expert": e, "selection_frequency": s.any_slot[e], "ci_low": s.any_slot_low[e],
                "ci_high": s.any_slot_high[e], "uniform": m.top_k / m.num_experts, "primary_frequency": s.primary[e],
                "primary_ci_low": s.primary_low[e], "primary_ci_high": s.primary_high[e]})
        for d in m.domains:
            for e in range(m.num_experts):
                tables["router_metrics_domains"].append({
                    "layer": m.layer, "domain": d.label, "expert": e, "share": d.share[e], "ci_low": d.share_low[e],
                    "ci_high": d.share_high[e], "specialisation": d.specialisation[e],
                    "lift_over_layer": d.lift_over_layer[e]})
        for a in range(m.num_experts):
            for b in range(m.num_experts):
                if a != b:
                    tables["router_metrics_pairs"].append({
                        "layer": m.layer, "a": a, "b": b, "coactivation": m.coactivation.matrix[a, b],
                        "coactivation_baseline_random_order": m.coactivation.baseline[a, b],
                        "coactivation_baseline_independent": m.coactivation.independent[a, b],
                        "cochosen_tokens": int(m.coactivation.cochosen[a, b]),
                        "token_overlap": None if m.token_overlap is None else m.token_overlap.matrix[a, b]})
    return tables


def _plot_metrics(res, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lazarus_core.cli.analysis_common import save_figure

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    first = res.layers[0]
    load = np.array([m.selection.any_slot / (m.top_k / m.num_experts) for m in res.layers])
    im = ax1.imshow(load, aspect="auto", cmap="RdBu_r", vmin=0, vmax=max(2.0, float(load.max())))
    ax1.set(xlabel="expert", ylabel="layer", title="selection frequency ÷ k/E",
            yticks=range(len(res.layers)), yticklabels=[str(m.layer) for m in res.layers])
    fig.colorbar(im, ax=ax1)
    x = [m.layer for m in res.layers]
    vs = [np.nan if m.vocabulary.value is None else m.vocabulary.value.estimate for m in res.layers]
    ax2.plot(x, vs, "o-", label="vocabulary specialisation")
    ax2.plot(x, [m.vocabulary.null_mean for m in res.layers], "o:", color="grey", label="permutation null")
    if first.saturation is not None:
        ax2.plot(x, [m.saturation.topk.estimate for m in res.layers], "s-", label="router saturation")
        ax2.plot(x, [m.saturation.topk_baseline for m in res.layers], "s:", color="silver", label="independent sets")
    ax2.set(xlabel="layer", ylim=(0, 1.05), title=f"min count {res.min_count}")
    ax2.legend(fontsize=8)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------ register
def register(actions: argparse._SubParsersAction) -> None:
    """Add this module's actions to `introspect moe-expert`."""
    p = actions.add_parser("router-entropy", help="per-token router entropy per layer vs the marginal and log E "
                                                  "(needs router logits: captured now, or --trace from --logits)")
    _common_flags(p)
    p.add_argument("--bins", type=int, default=50, help="histogram bins (default 50)")
    p.set_defaults(func=run_router_entropy)

    p = actions.add_parser("router-distributions", help="histograms of raw logits, probabilities and renormalised "
                                                        "top-k weights; mean probability per top-k slot")
    _common_flags(p)
    p.add_argument("--bins", type=int, default=50, help="histogram bins (default 50)")
    p.set_defaults(func=run_router_distributions)

    p = actions.add_parser("router-metrics", help="OLMoE router metrics: selection frequency, domain and vocabulary "
                                                  "specialisation, token overlap, co-activation, saturation")
    _common_flags(p)
    p.add_argument("--min-count", type=int, default=10,
                   help="vocabulary specialisation: token ids with fewer occurrences are left out (default 10)")
    p.add_argument("--compare-trace", default=None, metavar="DIR",
                   help="a second trace of the same tokens (another checkpoint): router saturation "
                        "(checked too with --verify)")
    p.add_argument("--permutations", type=int, default=10, help="permutations per baseline (default 10)")
    p.set_defaults(func=run_router_metrics)
