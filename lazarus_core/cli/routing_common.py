"""What the routing actions share: flags, the loaded model, layer choice, traces (reuse or capture) and prompt routing."""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lazarus_core.cli.introspect import add_output_argument

LABELS_FILE = "lazarus_labels.json"


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


def add_trace_flags(parser: argparse.ArgumentParser) -> None:
    """``--trace DIR`` (reuse a capture) and ``--save-trace DIR`` (keep the capture this run makes)."""
    parser.add_argument("--trace", default=None, metavar="DIR", help="reuse a routing trace (lazarus capture)")
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
@dataclass
class PromptRouting:
    """One prompt routed through the model (no trace on disk: for explore, trace, chat).

    Attributes
    ----------
    text : str
    token_ids : list of int
    types : lazarus_core.tokens.TokenTypes
    layers : dict[int, (np.ndarray int [n, k], np.ndarray float32 [n, k])]
        Experts (sorted by weight) and weights per MoE layer.
    """

    text: str
    token_ids: list[int]
    types: object
    layers: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "types": self.types.to_dict(),
                "layers": {str(l): {"topk_ids": i.tolist(), "topk_weights": np.round(w, 6).tolist()}
                           for l, (i, w) in self.layers.items()}}


class Session:
    """The model, tokenizer, MoE layout and token classifier an action works with (loaded lazily)."""

    def __init__(self, args: argparse.Namespace, *, attention: bool = False) -> None:
        self.args = args
        self.spec = args.model
        self.attention = attention
        self._model = self._tokenizer = self._info = self._classifier = None
        self.source_name = None

    def load(self) -> "Session":
        if self._model is not None:
            return self
        if not self.spec:
            raise ValueError("-m/--model is required (or --trace with a trace that names its model)")
        from lazarus_core.routing.loading import load_model
        from lazarus_core.routing.locate import find_moe_layers

        try:
            model, tokenizer, source = load_model(self.spec, revision=getattr(self.args, "revision", None),
                                                  device=getattr(self.args, "device", "cpu"),
                                                  trust_remote_code=getattr(self.args, "trust_remote_code", False))
        except FileNotFoundError:
            raise
        except OSError as exc:            # a user error (unloadable checkpoint): one line, exit code 2
            raise ValueError(str(exc)) from None
        if tokenizer is None:
            raise ValueError(f"-m {self.spec}: the model has no tokenizer files; routing analyses need one")
        if self.attention:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("eager")
            else:
                model.config._attn_implementation = "eager"
        self._model, self._tokenizer, self.source_name = model, tokenizer, source.name
        self._info = find_moe_layers(model)
        return self

    @property
    def model(self):
        return self.load()._model

    @property
    def tokenizer(self):
        if self._tokenizer is None and not self.spec:
            raise ValueError("-m/--model is required")
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from lazarus_core.models.resolve import resolve_model

            source = resolve_model(self.spec, revision=getattr(self.args, "revision", None))
            location = str(source.root) if source.root is not None else source.name
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(location, revision=getattr(self.args, "revision", None))
            except (OSError, ValueError, TypeError) as exc:
                raise ValueError(f"-m {self.spec}: cannot load its tokenizer ({exc})") from None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    @property
    def info(self):
        return self.load()._info

    @property
    def classifier(self):
        if self._classifier is None:
            from lazarus_core.tokens import TokenClassifier, load_lexicon
            from lazarus_core.tokens.pos import nltk_pos_tagger

            a = self.args
            tagger = nltk_pos_tagger() if getattr(a, "pos_tagger", "none") == "nltk" else None
            self._classifier = TokenClassifier(load_lexicon(getattr(a, "lexicon", []) or [],
                                                            replace=getattr(a, "lexicon_replace", False)), tagger)
        return self._classifier

    @property
    def decoder(self):
        """A cached :class:`lazarus_core.tokens.PieceDecoder` for the tokenizer."""
        if getattr(self, "_decoder", None) is None:
            from lazarus_core.tokens import PieceDecoder

            self._decoder = PieceDecoder(self.tokenizer)
        return self._decoder

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens as the tokenizer adds them); empty text is a ValueError."""
        if not text or not text.strip():
            raise ValueError("the prompt is empty (-p)")
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError(f"the prompt {text!r} tokenises to zero tokens")
        return list(ids)

    def route_ids(self, ids: list[int], layers: list[int] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Routing of one sequence: layer -> (topk_ids int [n, k], topk_weights float32 [n, k])."""
        import torch

        from lazarus_core.routing.capture import decoder_of
        from lazarus_core.routing.recorder import RoutingRecorder

        device = next(self.model.parameters()).device
        with RoutingRecorder(self.model, layers, info=self.info) as rec, torch.inference_mode():
            decoder_of(self.model)(input_ids=torch.tensor([ids], device=device), use_cache=False)
            routed = rec.pop()
        return {l: (r.topk_ids.cpu().numpy().astype(np.int32), r.topk_weights.cpu().numpy()) for l, r in routed.items()}

    def route(self, text: str, layers: list[int] | None = None) -> PromptRouting:
        """Tokenise, classify and route ``text`` (in memory)."""
        ids = self.encode(text)
        types = self.decoder.classify_ids(self.classifier, ids)
        return PromptRouting(text, ids, types, self.route_ids(ids, layers))

    # ------------------------------------------------------------------------------------- traces
    def trace(self, prompts: list[str], labels: list[str] | None = None, *, layers: list[int] | None = None):
        """A trace for this action: ``--trace DIR`` if given, else a capture of ``prompts``.

        Returns
        -------
        (Trace, dict[int, str])
            The trace and its document labels (category or domain; from ``lazarus_labels.json`` when
            reusing a trace; empty if it has none).
        """
        from lazarus_core.routing.capture import capture_routing
        from lazarus_core.routing.corpus import corpus_from_prompts
        from lazarus_core.routing.trace_reader import load_trace

        if getattr(self.args, "trace", None):
            trace = load_trace(self.args.trace)
            if not self.spec:
                self.spec = trace.meta.get("tokenizer") or trace.meta.get("model")
            labels_path = Path(self.args.trace) / LABELS_FILE
            doc_labels = ({int(k): v for k, v in json.loads(labels_path.read_text()).items()}
                          if labels_path.is_file() else {})
            return trace, doc_labels
        out = getattr(self.args, "save_trace", None)
        if out is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lazarus-trace-")
            out = Path(self._tmp.name) / "trace"
        capture_routing(self.model, self.tokenizer, corpus_from_prompts(prompts), out, layers=layers,
                        seq_len=512, batch_size=8, progress=False,
                        model_meta={"model": self.source_name, "tokenizer": self.spec})
        doc_labels = {i: l for i, l in enumerate(labels)} if labels else {}
        if labels:
            (Path(out) / LABELS_FILE).write_text(json.dumps({str(k): v for k, v in doc_labels.items()}, indent=1))
        return load_trace(out), doc_labels


def console():
    from rich.console import Console

    return Console()


def emit(args: argparse.Namespace, payload: dict) -> None:
    """Write ``payload`` to ``-o FILE.json`` when asked."""
    if getattr(args, "output", None):
        from lazarus_core.cli.io import write_json

        write_json(args.output, payload)
        console().print(f"wrote {args.output}")


def experts_str(ids, weights=None, k: int | None = None) -> str:
    """``'E3 E1'`` or ``'E3:.61 E1:.22'``."""
    ids = list(ids)[:k] if k else list(ids)
    if weights is None:
        return " ".join(f"E{int(e)}" for e in ids)
    return " ".join(f"E{int(e)}:{float(w):.2f}" for e, w in zip(ids, weights))
