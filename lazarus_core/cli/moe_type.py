"""Actions `moe-type-analyze` and `moe-type-compare`: is each MoE layer native or upcycled?"""

from __future__ import annotations

import argparse

from lazarus_core.cli.introspect import add_model_argument, add_output_argument
from lazarus_core.cli.io import write_json


def _analyze(model: str, revision: str | None, layers_spec: str | None, backend: str, progress: bool,
             base_method: str = "refined", device: str = "cpu", parts_dir: str | None = None):
    from lazarus_core.analysis.expert_structure import analyze_moe_type, parse_layers
    from lazarus_core.models import open_moe_checkpoint
    from lazarus_core.spectra.parallel import use_device

    use_device(device)  # also the default of the distributed path's spectra
    ckpt = open_moe_checkpoint(model, revision=revision)
    layers = parse_layers(layers_spec, ckpt.moe_layers)
    return analyze_moe_type(ckpt, layers, backend=backend, progress=progress, model_name=model, base_method=base_method,
                            device=device, parts_dir=parts_dir)


def _layers_spec(args: argparse.Namespace) -> str | None:
    if args.layer is not None and args.layers is not None:
        raise SystemExit("error: use --layer N or --layers LIST, not both")
    return str(args.layer) if args.layer is not None else args.layers


def _report_table(report, verbose: bool):
    from rich.table import Table

    table = Table(title=f"{report.model} ({report.family}, {report.num_experts} experts, top-{report.top_k})")
    for col in ("layer", "type", "conf.", "cos mean", "gate r95", "up r95", "down r95", "rank ratio", "delta energy",
                "overlay rank (g/u/d)"):
        table.add_column(col, justify="right")
    if verbose:
        table.add_column("above noise (g/u/d)", justify="right")
        table.add_column("norm spread", justify="right")
    for layer in report.layers:
        p = layer.projections
        row = [str(layer.layer), layer.moe_type, f"{layer.confidence:.2f}", f"{layer.cosine_similarity['mean']:.3f}",
               *(f"{p[k].effective_rank_95:.1f}/{p[k].max_rank}" for k in ("gate", "up", "down")),
               f"{layer.rank_ratio:.3f}",
               f"{sum(p[k].delta_energy_fraction for k in p) / len(p):.3f}",
               "/".join(str(p[k].compressor_rank) for k in ("gate", "up", "down"))]
        if verbose:
            row.append("/".join("-" if p[k].noise_floor is None else f"{p[k].noise_floor.mean_rank_above_noise:.1f}"
                                for k in ("gate", "up", "down")))
            row.append(f"{sum(p[k].norm_spread for k in p) / len(p):.3f}")
        table.add_row(*row)
    return table


def _print_report(report, args: argparse.Namespace) -> None:
    from rich.console import Console

    console = Console()
    console.print(_report_table(report, args.verbose))
    console.print(f"[bold]{report.moe_type}[/bold]  confidence {report.confidence:.2f}, "
                  f"{report.agreement:.0%} of {len(report.layers)} layers agree  ({report.seconds:.1f} s)")
    c = report.compression
    if c:
        verdict = "compressible" if c["compressible"] else "[bold red]not compressible[/bold red]"
        console.print(f"overlay at preset {c['preset']} (every expert keeps {c['energy']:g} of its delta energy above "
                      f"the quantisation noise, {c['base']} base, {c['dtype']} factors): {c['ratio']:.2f}x the experts "
                      f"as stored, {verdict}")
    biased = [(layer.layer, k, v.bias) for layer in report.layers for k, v in layer.projections.items() if v.bias]
    if biased:
        console.print(f"expert biases (reported separately, not in the spectra): mean |b| norm "
                      f"{sum(b['norm_mean'] for _, _, b in biased) / len(biased):.3f}")
    if getattr(args, "visualize", False):
        import torch

        from lazarus_core.viz.expert_geometry import render_heatmap, render_mds

        first = report.layers[0]
        cos = torch.tensor(first.projections["gate"].cosine_matrix)
        console.print(f"\nlayer {first.layer} gate: expert directions (2-D MDS of the cosine geometry)")
        console.print(render_mds(cos), highlight=False, markup=False)
        console.print(f"\nlayer {first.layer} gate: cosine heatmap (' ' <= 0 ... '@' = 1)")
        console.print(render_heatmap(cos), highlight=False, markup=False)
    if getattr(args, "plot", None):
        from lazarus_core.viz.expert_geometry import plot_report

        console.print(f"wrote {plot_report(report, args.plot)}")


def _run_analyze(args: argparse.Namespace) -> int:
    from lazarus_core.distributed import current_world

    report = _analyze(args.model, args.revision, _layers_spec(args), args.backend, progress=not args.no_progress,
                      base_method=args.base_method, device=args.device,
                      parts_dir=f"{args.output}.parts" if args.output else None)  # torchrun: resumable layers
    if not current_world().is_root:  # under torchrun every rank holds the report; rank 0 reports it
        return 0
    _print_report(report, args)
    if args.output:
        write_json(args.output, report.to_dict())
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    spec = _layers_spec(args)
    a = _analyze(args.model, args.revision, spec, args.backend, progress=not args.no_progress,
                 base_method=args.base_method, device=args.device)
    b = _analyze(args.compare_model, args.compare_revision, spec, args.backend, progress=not args.no_progress,
                 base_method=args.base_method, device=args.device)
    table = Table(title="moe-type-compare")
    table.add_column("")
    table.add_column(a.model)
    table.add_column(b.model)
    rows = [("family", a.family, b.family), ("experts / top-k", f"{a.num_experts} / {a.top_k}", f"{b.num_experts} / {b.top_k}"),
            ("moe type", a.moe_type, b.moe_type), ("confidence", f"{a.confidence:.2f}", f"{b.confidence:.2f}"),
            ("layer agreement", f"{a.agreement:.0%}", f"{b.agreement:.0%}"),
            ("overlay ratio (preset balanced)", f"{a.compression['ratio']:.2f}x", f"{b.compression['ratio']:.2f}x")]
    for name, fn in (("mean rank ratio (95%)", lambda r: sum(x.rank_ratio for x in r.layers) / len(r.layers)),
                     ("mean expert cosine", lambda r: sum(x.cosine_similarity["mean"] for x in r.layers) / len(r.layers))):
        rows.append((name, f"{fn(a):.3f}", f"{fn(b):.3f}"))
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    if args.verbose:
        console.print(_report_table(a, True))
        console.print(_report_table(b, True))
    if args.output:
        write_json(args.output, {"models": [a.to_dict(), b.to_dict()]})
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--layer", type=int, default=None, help="one MoE layer (model layer index)")
    parser.add_argument("--layers", default=None, help="'all' (default) or comma-separated layer indices")
    parser.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "triton", "torch"),
                        help="kernel backend for the fused decode passes")
    parser.add_argument("--base", dest="base_method", default="refined", choices=("refined", "mean"),
                        help="overlay base of the compressor rank and ratio, as moe-overlay-compute --base (the "
                             "classification always reads W_e - mean); mean skips the refinement passes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_argument(parser)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the spectra's Grams and eigensolves run (lazarus_core.spectra.parallel)."""
    parser.add_argument("--device", default="cpu",
                        help="where the expert-delta Grams and eigensolves run: cpu (every core, single-threaded "
                             "workers) or a torch device such as cuda / cuda:1 (batched over experts, float64)")


def register(actions: argparse._SubParsersAction) -> None:
    """Add the moe-type actions."""
    analyze = actions.add_parser("moe-type-analyze", help="native MoE or pseudo-MoE, from expert-delta spectra")
    _common(analyze)
    analyze.add_argument("--visualize", action="store_true", help="terminal expert-direction diagram and cosine heatmap")
    analyze.add_argument("--plot", default=None, metavar="FILE.png", help="figure: energy curves, ranks, cosine heatmap")
    from lazarus_core.cli.moe_sweep import add_estimate_arguments, with_estimate  # --estimate: files, time, memory

    add_estimate_arguments(analyze)
    analyze.set_defaults(func=with_estimate(_run_analyze))
    compare = actions.add_parser("moe-type-compare", help="moe-type-analyze of two models side by side")
    _common(compare)
    add_device_argument(compare)  # moe-type-analyze's --device comes with its --estimate arguments
    compare.add_argument("-c", "--compare-model", required=True, help="the second model")
    compare.add_argument("--compare-revision", default=None)
    compare.set_defaults(func=_run_compare)
