"""What the routing actions share: flags, the loaded model, layer choice, traces (reuse or capture) and prompt routing."""

from __future__ import annotations

import argparse

from lazarus_core.cli.introspect import add_output_argument
from lazarus_core.routing.session import LABELS_FILE, PromptRouting, RoutingSession

__all__ = ["LABELS_FILE", "PromptRouting", "RoutingSession", "Session", "add_common", "add_model_flags",
           "add_layer_flags", "add_classifier_flags", "add_trace_flags", "parse_int_list", "middle_layer",
           "choose_layers", "console", "emit", "experts_str", "lit", "add_verify_flag"]


# --------------------------------------------------------------------------------------------- flags
def add_model_flags(parser: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """``-m/--model`` (optional when ``--trace`` names the model), ``--revision``, ``--device``, ``--trust-remote-code``."""
    parser.add_argument("-m", "--model", required=model_required, default=None,
                        help="local directory, Hugging Face model id, or built-in alias (see `lazarus models`)"
                             + ("" if model_required else "; with --trace, defaults to the trace's model"))
    parser.add_argument("--revision", default=None, help="Hugging Face revision")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; fp32)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the checkpoint")


def add_layer_flags(parser: argparse.ArgumentParser, *, many: bool) -> None:
    """``--layer N`` and (for whole-model analyses) ``--layers 0,12,23|all``."""
    parser.add_argument("--layer", type=int, default=None,
                        help="MoE layer (model layer index; default: " + ("all" if many else "the middle MoE layer") + ")")
    if many:
        parser.add_argument("--layers", default=None, help="'all' (default) or comma-separated MoE layer indices")


def add_classifier_flags(parser: argparse.ArgumentParser) -> None:
    """``--lexicon FILE`` (repeatable), ``--lexicon-replace``, ``--view``, ``--pos-tagger``."""
    parser.add_argument("--lexicon", action="append", default=[], metavar="FILE",
                        help="extra lexicon file ([TYPE] headers, then words); repeatable")
    parser.add_argument("--lexicon-replace", action="store_true", help="use only the --lexicon files")
    parser.add_argument("--view", default="semantic", choices=("semantic", "structural"), help="token-type view")
    parser.add_argument("--pos-tagger", default="none", choices=("none", "nltk"),
                        help="optional POS tagger for NOUN/VERB/ADJ (off by default; never downloads)")


def add_verify_flag(parser: argparse.ArgumentParser) -> None:
    """``--verify``: check every shard of a reused trace against its sha256 in ``trace.json``."""
    parser.add_argument("--verify", action="store_true",
                        help="with --trace: check every shard's sha256 against trace.json first (reads every byte)")


def add_trace_flags(parser: argparse.ArgumentParser) -> None:
    """``--trace DIR`` (reuse a capture), ``--verify`` and ``--save-trace DIR`` (keep the capture this run makes)."""
    parser.add_argument("--trace", default=None, metavar="DIR", help="reuse a routing trace (lazarus capture)")
    add_verify_flag(parser)
    parser.add_argument("--save-trace", default=None, metavar="DIR", help="keep the trace this run captures in DIR")
    parser.add_argument("--seed", type=int, default=0, help="seed of the default prompts and permutations")


def add_common(parser: argparse.ArgumentParser, *, many_layers: bool, trace: bool = True, model_required: bool = False,
               classifier: bool = True) -> None:
    add_model_flags(parser, model_required=model_required and not trace)
    add_layer_flags(parser, many=many_layers)
    if trace:
        add_trace_flags(parser)
    if classifier:
        add_classifier_flags(parser)
    add_output_argument(parser)


def parse_int_list(text: str | None, flag: str) -> list[int] | None:
    """``'1,2,3'`` -> [1, 2, 3]; None stays None; raises ValueError naming ``flag``."""
    if text is None:
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated integers, got {text!r}") from None


# ----------------------------------------------------------------------------------------- layers
def middle_layer(layers: list[int]) -> int:
    """The default single layer: the middle MoE layer (derived from the model, not hard-coded)."""
    return sorted(layers)[len(layers) // 2]


def choose_layers(args: argparse.Namespace, available: list[int], *, many: bool) -> list[int]:
    """Validate ``--layer``/``--layers`` against ``available`` MoE layers.

    Raises
    ------
    ValueError
        Both flags, or a layer that is not an MoE layer (the message lists them).
    """
    available = sorted(available)
    spec = getattr(args, "layers", None)
    if args.layer is not None and spec is not None:
        raise ValueError("use --layer N or --layers LIST, not both")
    if args.layer is not None:
        chosen = [args.layer]
        flag = "--layer"
    elif spec is not None and spec.strip().lower() != "all":
        chosen = parse_int_list(spec, "--layers")
        flag = "--layers"
    else:
        return list(available) if many else [middle_layer(available)]
    bad = [l for l in chosen if l not in available]
    if bad:
        raise ValueError(f"{flag} {','.join(map(str, bad))} is out of range: the MoE layers are {available}")
    return chosen


# ---------------------------------------------------------------------------------------- session
class Session(RoutingSession):
    """A :class:`lazarus_core.routing.session.RoutingSession` built from an action's parsed flags.

    Keeps ``.args`` (the actions read ``--view``, ``-v``) and reads ``--trace`` / ``--save-trace`` in
    :meth:`trace`.
    """

    def __init__(self, args: argparse.Namespace, *, attention: bool = False) -> None:
        super().__init__(getattr(args, "model", None), revision=getattr(args, "revision", None),
                         device=getattr(args, "device", "cpu"),
                         trust_remote_code=getattr(args, "trust_remote_code", False),
                         lexicon=getattr(args, "lexicon", []) or [],
                         lexicon_replace=getattr(args, "lexicon_replace", False),
                         pos_tagger=getattr(args, "pos_tagger", "none"), attention=attention)
        self.args = args

    def trace(self, prompts: list[str], labels: list[str] | None = None, *, layers: list[int] | None = None,
              logits: bool = False):
        """A trace for this action: ``--trace DIR`` if given, else a capture of ``prompts`` (kept in ``--save-trace``).

        Returns
        -------
        (Trace, dict[int, str])
            The trace and its document labels (empty if it has none).
        """
        return super().trace(prompts, labels, layers=layers, trace_dir=getattr(self.args, "trace", None),
                             save_to=getattr(self.args, "save_trace", None), logits=logits,
                             verify=getattr(self.args, "verify", False))


def console():
    """A rich console for action output (no ``:emoji:`` codes: user text stays literal)."""
    from rich.console import Console

    return Console(emoji=False)


def lit(text) -> str:
    """``text`` (a prompt, token piece, context, file name...) made literal inside rich markup."""
    from rich.markup import escape

    return escape(str(text))


def emit(args: argparse.Namespace, payload: dict) -> None:
    """Write ``payload`` to ``-o FILE.json`` when asked."""
    if getattr(args, "output", None):
        from lazarus_core.cli.io import write_json

        write_json(args.output, payload)
        console().print(f"wrote {lit(args.output)}")


def experts_str(ids, weights=None, k: int | None = None) -> str:
    """``'E3 E1'`` or ``'E3:.61 E1:.22'``."""
    ids = list(ids)[:k] if k else list(ids)
    if weights is None:
        return " ".join(f"E{int(e)}" for e in ids)
    return " ".join(f"E{int(e)}:{float(w):.2f}" for e, w in zip(ids, weights))
