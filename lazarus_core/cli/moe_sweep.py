"""Action `moe-type-sweep`: classify many models in one run and print the taxonomy table; and `--estimate` (here
and on moe-type-analyze): files, bytes, time and memory of the job before anything is downloaded."""

from __future__ import annotations

import argparse
from typing import Callable

from lazarus_core.cli.introspect import add_output_argument
from lazarus_core.cli.io import write_json

COLUMNS = ("model", "experts / top-k", "call", "confidence", "gate r95 (% max)", "up r95 (% max)",
           "down r95 (% max)", "mean cosine", "compressible")


def _console():
    """A rich console; when stdout is not a terminal (a file, a pipe, a test) wide enough for a whole table row."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=240)


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def row_cells(row) -> list[str]:
    """The table cells of one :class:`~lazarus_core.analysis.moe_sweep.SweepRow` (terminal and markdown alike)."""
    if row.error is not None:
        return [row.model, "-", "failed", "-", "-", "-", "-", "-", "-"]
    ranks = [f"{row.rank_95[p]:.1f}/{row.max_rank[p]} ({row.rank_95_fraction[p]:.0%})" for p in ("gate", "up", "down")]
    compressible = "-" if row.compressible is None else \
        f"{'yes' if row.compressible else 'no'} ({row.compression_ratio:.2f}x)"
    return [row.model, f"{row.num_experts} / {row.top_k}", row.moe_type, f"{row.confidence:.2f}", *ranks,
            f"{row.cosine:.3f}", compressible]


def read_line(row) -> str:
    """One line saying what was read for a model (or why it failed)."""
    if row.error is not None:
        return f"{row.model}: failed: {row.error}"
    r = row.read
    return (f"{row.model}: read {len(r.layers)} MoE layer(s) ({', '.join(map(str, r.layers))}) from "
            f"{r.weight_files_read} of {r.weight_files_total} weight file(s), {_size(r.weight_file_bytes)} "
            f"(expert tensors {_size(r.expert_bytes)}) in {_duration(row.seconds)}")


def markdown_table(header: tuple[str, ...], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (``|`` in cells escaped)."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)]) + "\n"


def _sweep_markdown(sweep) -> str:
    table = markdown_table(COLUMNS, [row_cells(r) for r in sweep.rows])
    lines = [f"# moe-type-sweep (layers: {sweep.layers})", "", table, "What was read:", ""]
    lines += [f"- {read_line(r)}" for r in sweep.rows]
    return "\n".join(lines) + "\n"


def _print_sweep(sweep, console) -> None:
    from rich.table import Table

    table = Table(title=f"moe-type-sweep (layers: {sweep.layers})")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "call") else "right")
    for row in sweep.rows:
        table.add_row(*row_cells(row))
    console.print(table)
    for row in sweep.rows:
        console.print(read_line(row), highlight=False, markup=False)


ESTIMATE_COLUMNS = ("model", "layers", "files (weight files)", "bytes needed", "to download", "expert bytes",
                    "per expert", "time", "peak memory")


def estimate_cells(row) -> list[str]:
    """The table cells of one :class:`~lazarus_core.analysis.moe_sweep.EstimateRow`."""
    e = row.estimate
    if e is None:
        return [row.model, "-", "-", "-", "-", "-", "-", "-", "failed"]
    per = "/".join(f"{e.seconds_per_expert[p] * 1e3:.1f}" for p in ("gate", "up", "down")) + " ms"
    return [row.model, str(len(e.layers)), f"{len(e.files)} ({len(e.weight_files)} of {e.weight_files_total})",
            _size(e.bytes_needed), _size(e.bytes_to_download), _size(e.expert_bytes), per,
            f"{_duration(e.seconds)} ({e.nproc} proc)", _size(e.peak_memory_bytes_total)]


def print_estimate(result, console) -> None:
    """Render a :class:`~lazarus_core.analysis.moe_sweep.SweepEstimate`: table, failures, totals, method."""
    from rich.table import Table

    table = Table(title=f"estimate (layers: {result.layers}; nothing downloaded but config and index)")
    for col in ESTIMATE_COLUMNS:
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in result.rows:
        table.add_row(*estimate_cells(row))
    console.print(table)
    for row in result.rows:
        if row.error is not None:
            console.print(f"{row.model}: failed: {row.error}", highlight=False, markup=False)
    done = [r.estimate for r in result.rows if r.estimate is not None]
    if done:
        e = done[0]
        console.print(f"total: {_size(result.bytes_needed)} needed, {_size(result.bytes_to_download)} to download, "
                      f"about {_duration(result.seconds)} with {result.nproc} process(es), peak "
                      f"{_size(result.peak_memory_bytes)} of working memory", highlight=False)
        console.print(f"time = experts x projections x layers x the measured per-expert cost ({e.timing['what']}; "
                      f"median of {e.timing['repeats']} on {e.device}, {e.timing['threads']} threads) / processes",
                      highlight=False, markup=False)


def _estimate(models: list[str], layers: str | None, args: argparse.Namespace):
    from lazarus_core.analysis.moe_sweep import estimate_sweep

    return estimate_sweep(models, layers, revision=args.revision, nproc=args.nproc, device=args.device,
                          repeats=args.repeats, base_method=getattr(args, "base", "refined"))


def _write_outputs(args: argparse.Namespace, payload: dict, markdown: str) -> None:
    from pathlib import Path

    if args.output:
        write_json(args.output, payload)
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        from lazarus_core.atomic_io import atomic_write_text

        atomic_write_text(path, markdown)


def _estimate_markdown(result) -> str:
    return f"# estimate (layers: {result.layers})\n\n" + markdown_table(
        ESTIMATE_COLUMNS, [estimate_cells(r) for r in result.rows])


def _models(args: argparse.Namespace) -> list[str]:
    models = [*(args.model or []), *args.models]
    if not models:
        raise ValueError("moe-type-sweep needs at least one model: -m MODEL (repeatable) or MODEL arguments")
    return models


def _run_sweep(args: argparse.Namespace) -> int:
    from lazarus_core.analysis.moe_sweep import sweep_moe_type

    console = _console()
    models = _models(args)
    if args.estimate:
        result = _estimate(models, args.layers, args)
        print_estimate(result, console)
        _write_outputs(args, {"estimate": result.to_dict()}, _estimate_markdown(result))
        return 0
    def announce(model: str) -> None:
        console.print(f"analysing {model} ...", highlight=False, markup=False)

    sweep = sweep_moe_type(models, args.layers, revision=args.revision, backend=args.backend,
                           progress=not args.no_progress, base_method=args.base, device=args.device,
                           on_model=None if args.no_progress else announce)
    _print_sweep(sweep, console)
    _write_outputs(args, sweep.to_dict(), _sweep_markdown(sweep))
    return 0


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """``--estimate`` and its inputs (``--nproc``, ``--device``, ``--repeats``)."""
    parser.add_argument("--estimate", action="store_true",
                        help="print the files, bytes, time and memory the job needs (reads only config.json and the "
                             "shard index; times the engine's per-expert pass here) and exit without running it")
    parser.add_argument("--nproc", type=int, default=1, help="with --estimate: processes the job is split over")
    from lazarus_core.cli.moe_type import add_device_argument

    add_device_argument(parser)  # the analysis's device, and with --estimate the one the cost is measured on
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --estimate: timed runs of the per-expert cost (median)")
    parser.add_argument("--markdown", default=None, metavar="FILE.md", help="also write the table as markdown")


def with_estimate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a single-model action (``-m MODEL``, ``--layer``/``--layers``) so that ``--estimate`` prints the
    estimate (and writes ``-o`` / ``--markdown``) instead of running it."""
    def dispatch(args: argparse.Namespace) -> int:
        if not args.estimate:
            return run(args)
        if getattr(args, "layer", None) is not None and args.layers is not None:
            raise ValueError("use --layer N or --layers LIST, not both")
        layers = str(args.layer) if getattr(args, "layer", None) is not None else args.layers
        result = _estimate([args.model], layers, args)
        if result.rows[0].error is not None:
            raise ValueError(result.rows[0].error)
        print_estimate(result, _console())
        _write_outputs(args, {"estimate": result.to_dict()}, _estimate_markdown(result))
        return 0

    return dispatch


def register(actions: argparse._SubParsersAction) -> None:
    """Add the moe-type-sweep action."""
    sweep = actions.add_parser("moe-type-sweep", help="moe-type-analyze of many models: one taxonomy table")
    sweep.add_argument("models", nargs="*", metavar="MODEL", help="models to classify (also -m, repeatable)")
    sweep.add_argument("-m", "--model", action="append", default=None,
                       help="local directory, Hugging Face model id, or built-in alias (repeatable)")
    sweep.add_argument("--revision", default=None, help="Hugging Face revision for every hub model")
    sweep.add_argument("--layers", default=None, help="'all' (default) or comma-separated layer indices")
    sweep.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "triton", "torch"),
                       help="kernel backend for the fused decode passes")
    sweep.add_argument("--base", default="refined", metavar="refined|mean",
                       help="the compressor's base for the compressible column (as moe-overlay-compute --base)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_estimate_arguments(sweep)
    add_output_argument(sweep)
    sweep.set_defaults(func=_run_sweep)
