"""`lazarus introspect moe-expert ACTION -m MODEL [flags]`: the reference toolkit's command surface.

Each action module exposes ``register(actions)``, adding one argparse sub-parser per action it
implements (with ``set_defaults(func=...)``); this module only wires them together.
"""

from __future__ import annotations

import argparse
import importlib

# Modules that implement actions, in the order their actions appear in --help.
ACTION_MODULES = (
    "lazarus_core.cli.moe_type",
    "lazarus_core.cli.moe_sweep",
    "lazarus_core.cli.overlay",
    "lazarus_core.cli.routing_explore",
    "lazarus_core.cli.routing_taxonomy",
    "lazarus_core.cli.routing_context",
    "lazarus_core.cli.routing_stats",
    "lazarus_core.cli.routing_interventions",
    "lazarus_core.cli.routing_attention",
    "lazarus_core.cli.routing_metrics",
    "lazarus_core.cli.routing_activations",
    "lazarus_core.cli.routing_experts",
    "lazarus_core.cli.dynamics_usage",
    "lazarus_core.cli.dynamics_interventions",
    "lazarus_core.cli.dynamics_prediction",
)


def add_model_argument(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The shared ``-m/--model`` flag (local directory, Hugging Face id or built-in alias) and ``--revision``."""
    parser.add_argument("-m", "--model", required=required,
                        help="local directory, Hugging Face model id, or built-in alias (see `lazarus models`)")
    parser.add_argument("--revision", default=None, help="Hugging Face revision (branch, tag or commit)")


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    """The shared ``-o/--output FILE.json`` and ``-v`` flags."""
    parser.add_argument("-o", "--output", default=None, metavar="FILE.json", help="write the result as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="more detail in the tables")


DEFAULT_ACTION = "explore"


def with_default_action(argv: list[str]) -> list[str]:
    """``introspect moe-expert -m M ...`` (no ACTION, as in the reference toolkit) means ``... explore -m M``."""
    for i in range(len(argv) - 1):
        if argv[i] == "introspect" and argv[i + 1] == "moe-expert":
            rest = argv[i + 2:]
            if rest and rest[0].startswith("-") and rest[0] not in ("-h", "--help"):
                return [*argv[: i + 2], DEFAULT_ACTION, *rest]
            break
    return argv


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``introspect moe-expert ACTION`` to the top-level parser."""
    introspect = sub.add_parser("introspect", help="introspection commands of the reference toolkit")
    groups = introspect.add_subparsers(dest="group", metavar="GROUP")
    moe_expert = groups.add_parser("moe-expert", help="analyse MoE experts: `lazarus introspect moe-expert ACTION -m MODEL`")
    actions = moe_expert.add_subparsers(dest="action", metavar="ACTION")
    for name in ACTION_MODULES:
        importlib.import_module(name).register(actions)
