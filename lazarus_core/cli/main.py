"""Entry point of the `lazarus` console script: builds the argument parser and runs a subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from lazarus_core import BackendUnavailableError, __version__
from lazarus_core.distributed import RankFailed


def _cmd_models(args: argparse.Namespace) -> int:
    from lazarus_core.models import list_builtin_models
    from lazarus_core.models.families import supported_families

    models = [m.to_dict() for m in list_builtin_models()]
    if args.json:
        print(json.dumps({"models": models, "families": supported_families()}, indent=2))
        return 0
    if not models:
        print("No built-in models are installed.")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Built-in models")
    for col in ("alias", "family", "experts", "top-k", "size", "description"):
        table.add_column(col)
    for m in models:
        table.add_row(m["alias"], m["family"], str(m["num_experts"]), str(m["top_k"]),
                      f"{m['size_bytes'] / 1e6:.1f} MB", m["description"])
    Console().print(table)
    print("supported families: " + ", ".join(f["family"] for f in supported_families()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="lazarus", description="Analyse and compress Mixture-of-Experts models.")
    parser.add_argument("--version", action="version", version=f"lazarus-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    models = sub.add_parser("models", help="list the built-in models")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=_cmd_models)
    __import__("lazarus_core.cli.capture", fromlist=["register"]).register(sub)
    __import__("lazarus_core.cli.introspect", fromlist=["register"]).register(sub)
    __import__("lazarus_core.cli.generate", fromlist=["register"]).register(sub)
    __import__("lazarus_core.cli.experiment", fromlist=["register"]).register(sub)
    __import__("lazarus_core.cli.merge", fromlist=["register"]).register(sub)
    return parser


def quiet_libraries(verbose: bool) -> None:
    """Hide transformers' and huggingface_hub's progress bars and warnings unless ``-v`` asks for them.

    Command output then holds only lazarus-core's own tables and messages (long-document tokenizer
    warnings and "Loading weights" bars say nothing about the analysis).
    """
    import logging
    import os

    level = logging.INFO if verbose else logging.ERROR
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(level)
        (hf_logging.enable_progress_bar if verbose else hf_logging.disable_progress_bar)()
    except ImportError:
        pass
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("huggingface_hub").setLevel(level)


# Output flags checked before a command runs (a long analysis must not end in "permission denied"):
# attribute -> (flag, is a directory). `capture -o` names the trace directory.
_OUTPUTS = {"output": ("-o/--output", False), "plot": ("--plot", False), "csv": ("--csv", True),
            "out": ("--out", True)}
# User errors: one line on stderr, exit code 2, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
               IndexError, BackendUnavailableError, RankFailed)


def check_outputs(args: argparse.Namespace) -> None:
    """Fail fast when an output file or directory a command will write cannot be written.

    Raises
    ------
    FileExistsError, IsADirectoryError, PermissionError
        Names the flag and the path.
    """
    from lazarus_core.atomic_io import check_output_dir, check_output_file

    for attr, (flag, is_dir) in _OUTPUTS.items():
        value = getattr(args, attr, None)
        if not isinstance(value, str) or not value:
            continue
        if is_dir or (attr == "output" and args.command == "capture"):
            check_output_dir(value, flag=flag)
        else:
            check_output_file(value, flag=flag)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    from lazarus_core.cli.introspect import with_default_action

    args = parser.parse_args(with_default_action(list(sys.argv[1:] if argv is None else argv)))
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    quiet_libraries(bool(getattr(args, "verbose", False)))
    code = 1
    try:
        check_outputs(args)
        code = args.func(args)
        return code
    except KeyboardInterrupt:
        # Ctrl-C: every file is written atomically, so nothing half-written is left behind.
        print("lazarus: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        # User errors (bad model, file, layer or option; an output that cannot be written): one clear line.
        print(f"lazarus: error: {exc}", file=sys.stderr)
        return 2
    finally:
        from lazarus_core.distributed import close_world

        close_world(failed=code != 0)  # under torchrun: leave the process group before the interpreter exits


if __name__ == "__main__":
    sys.exit(main())
