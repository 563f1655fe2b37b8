"""Actions expert-similarity, expert-projection (thin CLI over the library analyses)."""

from __future__ import annotations

import argparse
import math

import numpy as np

from lazarus_core.cli.analysis_common import add_analysis_flags, analysis_trace, save_figure, write_csv_tables
from lazarus_core.cli.routing_common import Session, add_common, choose_layers, console, emit, lit

NUM_TOKENS = 2048


def _interval(iv, digits: int = 3) -> str:
    """``'0.512 [0.498, 0.526]'`` from an Interval (or its dict)."""
    d = iv if isinstance(iv, dict) else iv.to_dict()
    if d["estimate"] is None or not math.isfinite(d["estimate"]):
        return "-"
    if d["low"] is None or not math.isfinite(d["low"]):
        return f"{d['estimate']:.{digits}f}"
    return f"{d['estimate']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def _plus_minus(iv, digits: int = 2) -> str:
    """``'0.21 ± 0.08'`` from a symmetric (normal) Interval."""
    if not math.isfinite(iv.estimate):
        return "-"
    if not math.isfinite(iv.low):
        return f"{iv.estimate:.{digits}f}"
    return f"{iv.estimate:.{digits}f}±{(iv.high - iv.low) / 2:.{digits}f}"


def _trace_and_layers(args: argparse.Namespace, session: Session, *, hidden_states: bool):
    """The trace with every expert's outputs (``--trace`` or a fresh capture) and the layers to analyse."""
    if args.trace:
        trace, _ = analysis_trace(args, session, hidden_states=hidden_states, all_experts=True,
                                  sample_tokens=args.num_tokens)
        return trace, choose_layers(args, trace.layers, many=True)
    layers = choose_layers(args, sorted(session.info.layers), many=True)
    trace, _ = analysis_trace(args, session, hidden_states=hidden_states, all_experts=True,
                              sample_tokens=args.num_tokens, layers=layers)
    return trace, layers


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:n]


# -------------------------------------------------------------------------------- expert-similarity
def run_expert_similarity(args: argparse.Namespace) -> int:
    """E x E similarity of expert outputs on the same tokens, with the random floor and the noise ceiling."""
    from rich.table import Table

    from lazarus_core.analysis.expert_similarity import trace_expert_similarity

    session = Session(args)
    trace, layers = _trace_and_layers(args, session, hidden_states=not args.no_floor)
    results = trace_expert_similarity(trace, layers, method=args.method, model=None if args.no_floor else session.model,
                                      max_tokens=args.num_tokens, seed=args.seed,
                                      unbiased=args.estimator == "unbiased", n_splits=args.splits)
    con = console()
    what = f"linear CKA, {args.estimator} HSIC" if args.method == "cka" else "mean per-token cosine"
    t = Table(title=f"expert-similarity ({what}) of {results[0].num_experts} experts on the same "
                    f"{results[0].num_tokens} tokens; ± = 95% half-sample interval; an expert against itself = 1")
    for col in ("L", "mean", "q05-q95", "top pair", "random", "excess", "split r"):
        t.add_column(col, justify="left" if col == "top pair" else "right", no_wrap=True)
    for r in results:
        q = r.off_diagonal.quantiles
        sh = r.ceiling.split_half_r
        a, b = r.off_diagonal.most_similar
        t.add_row(str(r.layer), _plus_minus(r.off_diagonal.mean), f"{q['q05']:.2f}-{q['q95']:.2f}",
                  f"E{a}~E{b} {r.off_diagonal.max:.2f}",
                  "-" if r.floor is None else _plus_minus(r.floor.off_diagonal.mean),
                  "-" if r.floor is None else _plus_minus(r.floor.excess), "-" if sh is None else f"{sh.estimate:.2f}")
    con.print(t)
    con.print("L: layer; mean, q05-q95, top pair: over the expert pairs; random: the same between the layer's experts "
              "re-initialised at random and run on the same hidden states (what shared inputs alone give); excess: "
              "mean - random; split r: correlation of the pairs' values on two disjoint halves of the documents "
              "(near 0: the pattern is noise at this many tokens)" if not args.no_floor else
              "no random-expert reference (--no-floor): the values have no chance baseline")
    if args.verbose:
        for r in results:
            m = Table(title=f"layer {r.layer}: {args.method} between experts")
            m.add_column("")
            for e in range(r.num_experts):
                m.add_column(f"E{e}", justify="right")
            for i in range(r.num_experts):
                m.add_row(f"E{i}", *(f"{v:.2f}" for v in r.matrix[i]))
            con.print(m)
    write_csv_tables(args, _similarity_tables(results))
    if args.plot:
        con.print(f"wrote {lit(_similarity_heatmap(results, args.plot))}")
    emit(args, {"action": "expert-similarity", "model": session.model_name, "trace": args.trace, "method": args.method,
                "estimator": results[0].estimator, "layers": [r.to_dict() for r in results]})
    return 0


def _similarity_tables(results) -> dict[str, list[dict]]:
    pairs, summary = [], []
    for r in results:
        e = r.num_experts
        for i in range(e):
            for j in range(i + 1, e):
                row = {"layer": r.layer, "expert_a": i, "expert_b": j, "similarity": float(r.matrix[i, j])}
                if r.floor is not None:
                    row["floor_similarity"] = float(r.floor.matrix[i, j])
                pairs.append(row)
        d = r.to_dict()
        row = {"layer": r.layer, "method": r.method, "estimator": r.estimator, "num_tokens": r.num_tokens,
               "mean": d["off_diagonal"]["mean"]["estimate"], "mean_low": d["off_diagonal"]["mean"]["low"],
               "mean_high": d["off_diagonal"]["mean"]["high"], **d["off_diagonal"]["quantiles"]}
        if r.floor is not None:
            row.update(floor_mean=d["floor"]["off_diagonal"]["mean"]["estimate"],
                       floor_low=d["floor"]["off_diagonal"]["mean"]["low"],
                       floor_high=d["floor"]["off_diagonal"]["mean"]["high"],
                       excess=d["floor"]["excess"]["estimate"], excess_low=d["floor"]["excess"]["low"],
                       excess_high=d["floor"]["excess"]["high"])
        ceiling = d["ceiling"]
        row.update(split_half_r=None if ceiling["split_half_r"] is None else ceiling["split_half_r"]["estimate"],
                   reliability=ceiling["reliability"])
        summary.append(row)
    return {"expert_similarity_pairs": pairs, "expert_similarity_summary": summary}


def _similarity_heatmap(results, path):
    fig, axes = _grid(len(results))
    low = min(0.0, float(np.nanmin([np.nanmin(r.matrix) for r in results])))
    for ax, r in zip(axes, results):
        im = ax.imshow(r.matrix, vmin=low, vmax=1.0, cmap="viridis")
        floor = "" if r.floor is None else f", random {r.floor.off_diagonal.mean.estimate:.2f}"
        ax.set_title(f"layer {r.layer}: mean {r.off_diagonal.mean.estimate:.2f}{floor}", fontsize=9)
        if r.num_experts <= 16:
            ax.set_xticks(range(r.num_experts))
            ax.set_yticks(range(r.num_experts))
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes, shrink=0.8,
                 label="linear CKA" if results[0].method == "cka" else "cosine")
    return save_figure(fig, path)


# -------------------------------------------------------------------------------- expert-projection
def run_expert_projection(args: argparse.Namespace) -> int:
    """2-D map (PCA or UMAP) of expert outputs coloured by expert, with kNN expert-label separation."""
    from rich.table import Table

    from lazarus_core.analysis.expert_projection import require_umap, trace_expert_projection

    if args.method == "umap":
        require_umap()                    # fail before capturing anything
    session = Session(args)
    trace, layers = _trace_and_layers(args, session, hidden_states=False)
    results = trace_expert_projection(trace, layers, method=args.method, max_tokens=args.num_tokens, k=args.k,
                                      n_permutations=args.permutations, max_points=args.max_points, seed=args.seed)
    con = console()
    t = Table(title=f"expert-projection ({args.method.upper()}) of every expert's output on the same tokens: "
                    f"leave-one-out {args.k}-NN accuracy of the expert label over {results[0].separation.num_points} "
                    "points of the 2-D map (95% intervals)")
    for col in ("L", "PC1 PC2", "kNN accuracy", "chance", "null", "p"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in results:
        s = r.separation
        evr = "-" if r.explained_variance_ratio is None else " ".join(f"{v:.0%}" for v in r.explained_variance_ratio)
        acc = s.accuracy
        t.add_row(str(r.layer), evr, f"{acc.estimate:.2f} ({acc.low:.2f}-{acc.high:.2f})",
                  f"{s.majority_rate:.2f}", f"{s.permuted_mean:.2f} ({s.permuted_low:.2f}-{s.permuted_high:.2f})",
                  f"{s.p_value:.3f}")
    con.print(t)
    con.print("L: layer; PC1 PC2: share of the outputs' variance on each axis; chance: always guessing the "
              "commonest expert; null: the same accuracy with the expert labels shuffled within each token "
              f"({args.permutations} draws, 2.5-97.5%); p: one-sided, from the null")
    write_csv_tables(args, _projection_tables(results))
    if args.plot:
        con.print(f"wrote {lit(_projection_scatter(results, args.plot))}")
    emit(args, {"action": "expert-projection", "model": session.model_name, "trace": args.trace, "method": args.method,
                "layers": [r.to_dict(points=args.points) for r in results]})
    return 0


def _projection_tables(results) -> dict[str, list[dict]]:
    points, summary = [], []
    for r in results:
        for (x, y), e, tok in zip(r.coords.tolist(), r.expert.tolist(), r.token.tolist()):
            points.append({"layer": r.layer, "token": tok, "expert": e, "x": x, "y": y})
        s = r.separation.to_dict()
        evr = r.explained_variance_ratio
        summary.append({"layer": r.layer, "method": r.method, "num_tokens": r.num_tokens, "num_points": s["num_points"],
                        "pc1_variance_ratio": None if evr is None else float(evr[0]),
                        "pc2_variance_ratio": None if evr is None else float(evr[1]),
                        "knn_accuracy": s["accuracy"]["estimate"], "knn_accuracy_low": s["accuracy"]["low"],
                        "knn_accuracy_high": s["accuracy"]["high"], "majority_rate": s["majority_rate"],
                        "permuted_mean": s["permuted_mean"], "permuted_low": s["permuted_low"],
                        "permuted_high": s["permuted_high"], "p_value": s["p_value"]})
    return {"expert_projection_points": points, "expert_projection_summary": summary}


def _projection_scatter(results, path):
    import matplotlib.pyplot as plt

    fig, axes = _grid(len(results))
    for ax, r in zip(axes, results):
        cmap = plt.get_cmap("tab10" if r.num_experts <= 10 else "tab20" if r.num_experts <= 20 else "turbo")
        colours = cmap(r.expert % cmap.N if r.num_experts <= 20 else r.expert / max(1, r.num_experts - 1))
        ax.scatter(r.coords[:, 0], r.coords[:, 1], c=colours, s=3, alpha=0.5, linewidths=0)
        acc = r.separation.accuracy.estimate
        ax.set_title(f"layer {r.layer}: kNN {acc:.2f} (null {r.separation.permuted_mean:.2f})", fontsize=9)
        if r.explained_variance_ratio is not None:
            ax.set_xlabel(f"PC1 ({r.explained_variance_ratio[0]:.0%})")
            ax.set_ylabel(f"PC2 ({r.explained_variance_ratio[1]:.0%})")
        if r.num_experts <= 20 and ax is axes[0]:
            for e in range(r.num_experts):
                ax.scatter([], [], color=cmap(e % cmap.N), s=10, label=f"E{e}")
            ax.legend(fontsize=6, markerscale=1.5, ncol=2, loc="best")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------- register
def register(actions: argparse._SubParsersAction) -> None:
    """Add this module's actions to `introspect moe-expert`."""
    p = actions.add_parser("expert-similarity",
                           help="E x E similarity (linear CKA or cosine) of expert outputs on the same tokens")
    add_common(p, many_layers=True, classifier=False)
    add_analysis_flags(p, num_tokens=NUM_TOKENS)
    p.add_argument("--method", default="cka", choices=("cka", "cosine"),
                   help="cka: linear CKA (default); cosine: mean per-token cosine")
    p.add_argument("--estimator", default="unbiased", choices=("unbiased", "biased"),
                   help="HSIC estimator of CKA (default unbiased; biased is inflated at small n)")
    p.add_argument("--splits", type=int, default=20, help="random half splits for intervals and reliability (20)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the random-expert floor (no model load; needs no --hidden-states in the trace)")
    p.set_defaults(func=run_expert_similarity)

    p = actions.add_parser("expert-projection", help="2-D map (PCA or UMAP) of expert outputs coloured by expert")
    add_common(p, many_layers=True, classifier=False)
    add_analysis_flags(p, num_tokens=NUM_TOKENS)
    p.add_argument("--method", default="pca", choices=("pca", "umap"),
                   help="pca (torch, default) or umap (needs: pip install umap-learn)")
    p.add_argument("--k", type=int, default=5, help="neighbours of the kNN expert-label accuracy (5)")
    p.add_argument("--permutations", type=int, default=20, help="draws of the permuted-label null (20)")
    p.add_argument("--max-points", type=int, default=4000, help="points kept for the kNN baseline and the plot (4000)")
    p.add_argument("--points", action="store_true", help="include the 2-D coordinates in the -o JSON")
    p.set_defaults(func=run_expert_projection)
