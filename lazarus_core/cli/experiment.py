"""`lazarus experiment run CONFIG.yaml` and `lazarus experiment status DIR`: thin CLI over lazarus_core.experiment."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``experiment run|status|example`` to the top-level parser."""
    p = subparsers.add_parser("experiment", help="run a list of routing analyses from a YAML config")
    sub = p.add_subparsers(dest="experiment_command", metavar="COMMAND")
    run = sub.add_parser("run", help="run (or resume) an experiment: results/<name>.json, figures/, index.json")
    run.add_argument("config", metavar="CONFIG.yaml", help="experiment config, or demo:routing (the shipped example)")
    run.add_argument("--out", default=None, metavar="DIR", help="output directory (default experiments/<name>)")
    run.add_argument("--force", action="store_true", help="redo steps that are already done")
    run.add_argument("--json", action="store_true", help="print index.json instead of a table")
    run.set_defaults(func=run_run)
    status = sub.add_parser("status", help="show what an experiment directory holds")
    status.add_argument("dir", metavar="DIR")
    status.add_argument("--json", action="store_true", help="print index.json")
    status.set_defaults(func=run_status)
    example = sub.add_parser("example", help="print the shipped example config (every routing analysis on demo:native)")
    example.set_defaults(func=run_example)


def _table(index: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"experiment {index['name']} ({index['out_dir']}; trace {index['trace']})"
                           + ("" if index.get("complete", True) else " [incomplete]")))
    for col in ("analysis", "action", "status", "seconds", "result / error"):
        t.add_column(col)
    for s in index["steps"]:
        t.add_row(escape(str(s["name"])), escape(str(s["action"])), escape(str(s["status"])), f"{s['seconds']:.1f}",
                  escape(str(s["error"] or s["result"] or "-")))
    Console(emoji=False).print(t)


def run_run(args: argparse.Namespace) -> int:
    import json

    from lazarus_core.experiment import run_experiment

    def say(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    report = run_experiment(args.config, args.out, force=args.force, progress=say)
    index = dict(report.to_dict(), complete=True)
    if args.json:
        print(json.dumps(index, indent=2))
    else:
        _table(index)
    return 1 if report.failed else 0


def run_status(args: argparse.Namespace) -> int:
    import json

    from lazarus_core.experiment import experiment_status

    index = experiment_status(args.dir)
    if args.json:
        print(json.dumps(index, indent=2))
    else:
        _table(index)
    return 0


def run_example(args: argparse.Namespace) -> int:
    from lazarus_core.experiment.runner import builtin_config_path

    print(builtin_config_path("demo:routing").read_text(), end="")
    return 0
