"""Actions moe-overlay-estimate / -compute / -compress / -verify: store pseudo-MoE experts as a shared base
plus low-rank factors, check the loss, and say plainly when the overlay does not pay."""

from __future__ import annotations

import argparse

from lazarus_core.cli.introspect import add_model_argument, add_output_argument
from lazarus_core.cli.io import write_json

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


def _layers_spec(args: argparse.Namespace) -> str | None:
    if args.layer is not None and args.layers is not None:
        raise ValueError("use --layer N or --layers LIST, not both")
    return str(args.layer) if args.layer is not None else args.layers


def _open(args: argparse.Namespace):
    from lazarus_core.analysis.expert_structure import parse_layers
    from lazarus_core.models import open_moe_checkpoint

    if getattr(args, "device", None) is not None:  # where the spectra's Grams and eigensolves run
        from lazarus_core.spectra.parallel import use_device

        use_device(args.device)
    ckpt = open_moe_checkpoint(args.model, revision=args.revision)
    return ckpt, parse_layers(_layers_spec(args), ckpt.moe_layers)


def _policy(args: argparse.Namespace):
    from lazarus_core.overlay.ranks import make_policy

    return make_policy(rank=args.rank, gate_rank=args.gate_rank, up_rank=args.up_rank, down_rank=args.down_rank,
                       energy=args.energy, target_ratio=args.target_ratio, preset=getattr(args, "preset", None))


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n < 1e9 else f"{n / 1e9:.3f} GB"


def _bytes_table(title: str, rows: list[tuple[str, object]]):
    from rich.table import Table

    table = Table(title=title)
    for col in ("policy", "experts original", "experts overlay", "experts ratio", "model original", "model overlay",
                "model ratio"):
        table.add_column(col, justify="right" if col != "policy" else "left")
    for label, b in rows:
        table.add_row(label, _mb(b.original_expert_bytes), _mb(b.overlay_expert_bytes), f"{b.expert_ratio:.2f}x",
                      _mb(b.original_model_bytes), _mb(b.overlay_model_bytes), f"{b.model_ratio:.2f}x")
    return table


def _preset_plans(ckpt, layers, spectra, dtype, model, args):
    from lazarus_core.overlay.compute import plan_overlay
    from lazarus_core.overlay.ranks import PRESETS, make_policy

    return {name: plan_overlay(ckpt, layers, make_policy(preset=name), dtype=dtype, spectra=spectra, model_name=model,
                               base_method=args.base_method, base_dtype=args.base_dtype)
            for name in PRESETS}


def _run_estimate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lazarus_core.overlay.compute import compute_spectra, plan_overlay
    from lazarus_core.overlay.sizes import FORMULA, byte_report

    ckpt, layers = _open(args)
    policy = _policy(args)
    console = Console()
    fixed = policy.rank is not None or bool(policy.projection_ranks)
    if fixed:  # no spectra needed: ranks are given
        ranks = {}
        for layer in layers:
            for p in ("gate", "up", "down"):
                r = policy.projection_ranks[p] if policy.projection_ranks else policy.rank
                ranks[(layer, p)] = min(r, min(ckpt.projection_shape(p)))
        chosen = byte_report(ckpt, ranks, args.dtype, layers, args.base_dtype)
        rows, presets = [(policy.describe(), chosen)], {}
    else:
        spectra = compute_spectra(ckpt, layers, backend=args.backend, progress=not args.no_progress,
                                  base_method=args.base_method)
        chosen = plan_overlay(ckpt, layers, policy, dtype=args.dtype, spectra=spectra, model_name=args.model,
                              base_method=args.base_method, base_dtype=args.base_dtype).bytes
        presets = {k: v.bytes for k, v in _preset_plans(ckpt, layers, spectra, args.dtype, args.model, args).items()}
        rows = [(policy.describe(), chosen)] + [(f"preset {k}", v) for k, v in presets.items()]
    console.print(_bytes_table(f"{args.model} ({ckpt.family}, {ckpt.num_experts} experts, experts stored as "
                               f"{chosen.source_storage}; overlay {args.dtype})", rows))
    console.print(f"[dim]formula: {FORMULA}[/dim]")
    if chosen.expert_ratio < 1:
        console.print(f"[bold red]the overlay does not pay:[/bold red] {1 / chosen.expert_ratio:.2f}x larger than the "
                      f"experts as stored")
    if args.output:
        write_json(args.output, {"model": args.model, "family": ckpt.family, "layers": layers,
                                 "policy": policy.to_dict(), "policy_description": policy.describe(),
                                 "bytes": chosen.to_dict(), "presets": {k: v.to_dict() for k, v in presets.items()}})
    return 0


def _plan_table(plan, verbose: bool):
    from rich.table import Table

    table = Table(title=f"{plan.model}: overlay plan ({plan.policy.describe()}, {plan.dtype}, base "
                        f"{plan.base_method} in {plan.base_dtype or plan.dtype})")
    for col in ("layer", "proj", "shape", "rank", "energy kept (min expert)", "err mean", "err max", "bytes"):
        table.add_column(col, justify="right")
    for p in plan.projections:
        table.add_row(str(p.layer), p.projection, "x".join(map(str, p.shape)), f"{p.rank}/{p.max_rank}",
                      f"{p.captured_energy:.4f}", f"{p.error['mean']:.2e}", f"{p.error['max']:.2e}", _mb(p.overlay_bytes))
    return table


def _print_plan(plan, console, verbose: bool) -> None:
    from lazarus_core.overlay.sizes import FORMULA

    console.print(_plan_table(plan, verbose))
    b = plan.bytes
    console.print(f"experts: {_mb(b.original_expert_bytes)} as stored ({b.source_storage}) -> {_mb(b.overlay_expert_bytes)} "
                  f"overlay = [bold]{b.expert_ratio:.2f}x[/bold]; whole model {_mb(b.original_model_bytes)} -> "
                  f"{_mb(b.overlay_model_bytes)} = {b.model_ratio:.2f}x")
    console.print(f"[dim]formula: {FORMULA}[/dim]")
    for note in plan.notes:
        console.print(f"[bold red]{note}[/bold red]")


def _run_compute(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lazarus_core.distributed import current_world
    from lazarus_core.overlay.compute import plan_overlay
    from lazarus_core.overlay.distributed import plan_overlay_distributed

    ckpt, layers = _open(args)
    world, extra = current_world(), {}
    options = dict(dtype=args.dtype, backend=args.backend, progress=not args.no_progress, model_name=args.model,
                   base_method=args.base_method, base_dtype=args.base_dtype)
    if world.distributed:  # torchrun: layers split over the ranks, rank 0 reports
        job = plan_overlay_distributed(ckpt, layers, _policy(args), world=world, **options)
        plan, extra = job.plan, {"distributed": job.distributed}
        if not world.is_root:
            return 0
    else:
        plan = plan_overlay(ckpt, layers, _policy(args), **options)
    _print_plan(plan, Console(), args.verbose)
    if args.output:
        write_json(args.output, {**plan.to_dict(), **extra})
    return 0


def _run_compress(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pathlib import Path

    from lazarus_core.atomic_io import check_output_dir
    from lazarus_core.distributed import current_world
    from lazarus_core.overlay.compute import (check_storage, compute_spectra, overlay_fingerprint, plan_overlay,
                                              prepare_overlay_dir, write_overlay)
    from lazarus_core.overlay.distributed import compress_overlay_distributed
    from lazarus_core.overlay.plan_cache import PLAN_DIR
    from lazarus_core.overlay.ranks import PRESETS

    check_output_dir(args.out)
    ckpt, layers = _open(args)
    policy = _policy(args)
    check_storage(ckpt, args.dtype, args.base_dtype)
    console = Console()
    world, extra = current_world(), {}
    if world.distributed:  # torchrun: ranks take layers, one overlay directory and config; rank 0 reports
        job = compress_overlay_distributed(ckpt, layers, policy, args.out, world=world, model=args.model,
                                           revision=args.revision, dtype=args.dtype, base_method=args.base_method,
                                           base_dtype=args.base_dtype, backend=args.backend,
                                           resume=not args.no_resume, full_hash=args.full_hash,
                                           progress=not args.no_progress)
        if not world.is_root:
            return 0
        spectra, plan, result, extra = job.spectra, job.plan, job.result, {"distributed": job.distributed}
    else:
        # Everything that can refuse the job is checked before the spectra (the long part).
        previous = prepare_overlay_dir(ckpt, args.out, model=args.model, dtype=args.dtype,
                                       base_method=args.base_method, base_dtype=args.base_dtype,
                                       resume=not args.no_resume, full_hash=args.full_hash)
        fingerprint = overlay_fingerprint(ckpt, layers, previous, full_hash=args.full_hash)
        spectra = compute_spectra(ckpt, layers, backend=args.backend, progress=not args.no_progress,
                                  base_method=args.base_method, cache_dir=Path(args.out) / PLAN_DIR,
                                  fingerprint=fingerprint)
        plan = plan_overlay(ckpt, layers, policy, dtype=args.dtype, spectra=spectra, model_name=args.model,
                            base_method=args.base_method, base_dtype=args.base_dtype)
    presets = _preset_plans(ckpt, layers, spectra, args.dtype, args.model, args)
    _print_plan(plan, console, args.verbose)
    for name, p in presets.items():  # preset labels state the ratio they give on THIS model
        mark = " (chosen)" if policy.preset == name else ""
        console.print(f"preset {name} (energy {PRESETS[name]:g}): {p.bytes.expert_ratio:.2f}x experts, max error "
                      f"{max(x.error['max'] for x in p.projections):.2e}{mark}")
    if not world.distributed:
        result = write_overlay(ckpt, args.out, plan, model=args.model, revision=args.revision, backend=args.backend,
                               resume=True, progress=not args.no_progress, spectra=spectra, full_hash=args.full_hash,
                               fingerprint=fingerprint)  # resume=True: --no-resume already cleared the directory
    resumed = f" ({len(result['resumed_layers'])} layer(s) kept from an earlier run)" if result["resumed_layers"] else ""
    console.print(f"wrote overlay to {result['path']}{resumed}; it covers layers {result['config']['moe_layers']}")
    if result["missing_layers"]:
        console.print(f"[bold yellow]the overlay is not complete: layers {result['missing_layers']} of an earlier run "
                      f"into {args.out} are not written yet (rerun that run to finish them)[/bold yellow]")
    if args.output:
        write_json(args.output, {**plan.to_dict(), "out": result["path"], "written_layers": result["written_layers"],
                                 "resumed_layers": result["resumed_layers"], "missing_layers": result["missing_layers"],
                                 "overlay_layers": result["config"]["moe_layers"], **extra,
                                 "presets": {k: {"energy": PRESETS[k], "expert_ratio": v.bytes.expert_ratio,
                                                 "max_error": max(x.error["max"] for x in v.projections)}
                                             for k, v in presets.items()}})
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from lazarus_core.overlay.verify import verify_overlay

    text, source = None, ""
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise FileNotFoundError(f"--text {args.text}: no such file")
        text, source = path.read_text(), str(path)
    report = verify_overlay(args.model, args.overlay, text=text, text_source=source, max_tokens=args.max_tokens,
                            seq_len=args.seq_len, backend=args.backend, revision=args.revision,
                            outputs=not args.weights_only, force=args.force)
    console = Console()
    table = Table(title=f"{args.model} vs overlay {args.overlay}: reconstruction (relative Frobenius)")
    for col in ("layer", "proj", "rank", "err mean", "err max", "block output err"):
        table.add_column(col, justify="right")
    for r in report.reconstruction:
        block = report.block_output_error.get(str(r.layer))
        table.add_row(str(r.layer), r.projection, str(r.rank), f"{r.mean:.2e}", f"{r.max:.2e}",
                      "-" if block is None or r.projection != "gate" else f"{block:.2e}")
    console.print(table)
    size = (f"size ratio {report.size_ratio:.2f}x (source experts {_mb(report.source_expert_bytes)} / overlay "
            f"{_mb(report.overlay_bytes)})")
    if report.size_ratio < 1:
        size += f": the overlay is {1 / report.size_ratio:.2f}x LARGER than the experts it replaces"
    if report.passed is None:  # --weights-only: no verdict
        console.print(f"[bold red]{size}[/bold red]" if report.size_ratio < 1 else size)
    else:
        lo, hi = report.top1_agreement_ci95
        console.print(f"on {report.tokens} tokens of {report.text_source}: perplexity {report.perplexity_original:.4f} "
                      f"-> {report.perplexity_overlay:.4f} ({100 * report.perplexity_increase:+.3f}%), top-1 agreement "
                      f"{100 * report.top1_agreement:.2f}% (95% interval {100 * lo:.2f}-{100 * hi:.2f}%), logit KL "
                      f"{report.logit_kl:.2e} nats/token")
        t = report.thresholds
        if lo < t["min_top1_agreement"] <= hi:
            console.print(f"[yellow]the top-1 interval straddles the {100 * t['min_top1_agreement']:g}% threshold: "
                          "the verdict could flip on another sample; score more tokens (--max-tokens, --text)[/yellow]")
        verdict = "[bold green]PASS[/bold green]" if report.passed else "[bold red]FAIL[/bold red]"
        console.print(f"{verdict} {size} (thresholds: perplexity increase <= {100 * t['max_perplexity_increase']:g}%, "
                      f"top-1 agreement >= {100 * t['min_top1_agreement']:g}%, overlay no larger than the source)")
    if args.output:
        write_json(args.output, report.to_dict())
    return 0 if report.passed is not False else 1


def _common(parser: argparse.ArgumentParser, *, ranks: bool = True) -> None:
    add_model_argument(parser)
    parser.add_argument("--layer", type=int, default=None, help="one MoE layer (model layer index)")
    parser.add_argument("--layers", default=None, help="'all' (default) or comma-separated layer indices")
    if ranks:
        parser.add_argument("--rank", type=int, default=None, help="same rank for every layer and projection")
        parser.add_argument("--gate-rank", type=int, default=None)
        parser.add_argument("--up-rank", type=int, default=None)
        parser.add_argument("--down-rank", type=int, default=None)
        parser.add_argument("--energy", type=float, default=None,
                            help="per (layer, projection): smallest rank at which every expert keeps this fraction of "
                                 "its delta energy (delta from the base; MXFP4/FP8: only components above the "
                                 "quantisation-noise edge count)")
        parser.add_argument("--target-ratio", type=float, default=None,
                            help="expert compression ratio to reach; ranks go where they keep most delta energy per byte")
        parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="overlay storage dtype")
        parser.add_argument("--base", dest="base_method", default="refined", choices=("refined", "mean"),
                            help="shared base: mean of the experts, or refined by alternating least squares (default)")
        parser.add_argument("--base-dtype", default=None, choices=("bf16", "fp16", "fp32", "mxfp4"),
                            help="storage of the base (default: --dtype); mxfp4 = 4.25 bits/value like gpt-oss experts")
        from lazarus_core.cli.moe_type import add_device_argument

        add_device_argument(parser)
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_output_argument(parser)


def register(actions: argparse._SubParsersAction) -> None:
    """Add the moe-overlay-* actions."""
    est = actions.add_parser("moe-overlay-estimate", help="bytes and ratio of an overlay, by one stated formula")
    _common(est)
    est.set_defaults(func=_run_estimate)
    comp = actions.add_parser("moe-overlay-compute", help="ranks, bytes and reconstruction errors per layer/projection")
    _common(comp)
    comp.set_defaults(func=_run_compute)
    press = actions.add_parser("moe-overlay-compress", help="write the overlay checkpoint (resumable)")
    _common(press)
    press.add_argument("--out", required=True, metavar="DIR", help="overlay checkpoint directory")
    press.add_argument("--preset", default=None, choices=("fast", "balanced", "quality"),
                       help="--energy 0.90 / 0.95 / 0.99, counted as --energy counts (the ratio each gives on this "
                            "model is printed)")
    press.add_argument("--no-resume", action="store_true",
                       help="start over: delete the overlay and plan cache in --out instead of keeping finished layers")
    press.add_argument("--full-hash", action="store_true",
                       help="fingerprint every byte of the source experts (default: a deterministic 64 KiB sample per "
                            "tensor)")
    press.set_defaults(func=_run_compress)
    ver = actions.add_parser("moe-overlay-verify", help="reconstruction, block outputs, logit KL, perplexity, top-1")
    _common(ver, ranks=False)
    ver.add_argument("--overlay", required=True, metavar="DIR", help="overlay checkpoint directory")
    ver.add_argument("--text", default=None, metavar="FILE", help="evaluation text (default: built-in held-out corpus)")
    ver.add_argument("--max-tokens", type=int, default=2048, help="tokens scored")
    ver.add_argument("--seq-len", type=int, default=128, help="window length")
    ver.add_argument("--weights-only", action="store_true",
                     help="reconstruction errors and size only (no model run)")
    ver.add_argument("--force", action="store_true",
                     help="verify an overlay whose source fingerprint does not match -m (loud warning)")
    ver.set_defaults(func=_run_verify)
