"""`lazarus merge`: join moe-type-analyze reports of disjoint --layers parts into one report."""

from __future__ import annotations

import argparse

from lazarus_core.cli.io import write_json


def _run_merge(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lazarus_core.analysis.moe_type_merge import merge_moe_type_files

    report = merge_moe_type_files(args.parts)
    write_json(args.output, report.to_dict())
    Console().print(f"{report.model}: {len(report.layers)} layers from {len(args.parts)} parts -> [bold]"
                    f"{report.moe_type}[/bold] confidence {report.confidence:.2f}, {report.agreement:.0%} of layers "
                    f"agree, overlay {report.compression['ratio']:.2f}x; wrote {args.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``merge`` command."""
    merge = sub.add_parser("merge", help="join moe-type-analyze reports of disjoint --layers runs into one")
    merge.add_argument("parts", nargs="+", metavar="PART.json", help="moe-type-analyze -o reports")
    merge.add_argument("-o", "--output", required=True, metavar="OUT.json", help="the merged report")
    merge.set_defaults(func=_run_merge)
