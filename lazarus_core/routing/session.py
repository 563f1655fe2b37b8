"""A loaded MoE model with its tokenizer, MoE layout and token classifier, for routing prompts and capturing traces."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

LABELS_FILE = "lazarus_labels.json"


@dataclass
class PromptRouting:
    """One prompt routed through the model, in memory (no trace on disk).

    Attributes
    ----------
    text : str
    token_ids : list of int
    types : lazarus_core.tokens.TokenTypes
    layers : dict[int, (np.ndarray int32 [n, k], np.ndarray float32 [n, k])]
        Experts (sorted by weight, descending) and their weights per MoE layer.
    """

    text: str
    token_ids: list[int]
    types: object
    layers: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "types": self.types.to_dict(),
                "layers": {str(l): {"topk_ids": i.tolist(), "topk_weights": np.round(w, 6).tolist()}
                           for l, (i, w) in self.layers.items()}}


def read_doc_labels(trace_dir: str | Path) -> dict[int, str]:
    """Document labels stored beside a trace (``lazarus_labels.json``; empty when there is none)."""
    path = Path(trace_dir) / LABELS_FILE
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def write_doc_labels(trace_dir: str | Path, labels: dict[int, str]) -> None:
    """Store document labels beside a trace (read back by :func:`read_doc_labels`)."""
    (Path(trace_dir) / LABELS_FILE).write_text(json.dumps({str(k): v for k, v in labels.items()}, indent=1))


class RoutingSession:
    """The model, tokenizer, MoE layout and token classifier routing analyses work with (loaded lazily).

    Parameters
    ----------
    model : str or None
        Local directory, Hugging Face model id or built-in alias; may be filled in later (``.spec``),
        e.g. from a trace's metadata.
    revision : str, optional
        Hugging Face revision.
    device : str
        torch device (the model is loaded in fp32).
    trust_remote_code : bool
        Run code shipped with the checkpoint.
    lexicon : sequence of str
        Extra lexicon files for the token classifier.
    lexicon_replace : bool
        Use only the ``lexicon`` files.
    pos_tagger : {"none", "nltk"}
        Optional POS tagger of the classifier.
    attention : bool
        Load with eager attention (attention weights can be returned).

    Notes
    -----
    Errors a user can fix (no model given, an unloadable checkpoint, no tokenizer) are ValueErrors
    with a one-line message naming ``-m``.
    """

    def __init__(self, model: str | None = None, *, revision: str | None = None, device: str = "cpu",
                 trust_remote_code: bool = False, lexicon: Sequence[str] = (), lexicon_replace: bool = False,
                 pos_tagger: str = "none", attention: bool = False) -> None:
        self.spec = model
        self.revision = revision
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.lexicon = list(lexicon or [])
        self.lexicon_replace = lexicon_replace
        self.pos_tagger = pos_tagger
        self.attention = attention
        self._model = self._tokenizer = self._info = self._classifier = self._decoder = None
        self.source_name: str | None = None
        self.trace_model: str | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def model_name(self) -> str | None:
        """The model a result is about: a reused trace's model (``trace.json`` ``model``), else ``-m``.

        ``.spec`` may be a reused trace's tokenizer path (what loads); reports name the model instead.
        """
        return self.trace_model or self.spec

    def reuse_trace(self, trace_dir: str | Path, *, verify: bool = False):
        """Open an existing trace for this session: the model defaults to the one it names.

        Parameters
        ----------
        trace_dir : str or Path
            A trace directory (``lazarus capture``).
        verify : bool
            Check every shard's sha256 against ``trace.json`` first (``--verify``; reads every byte).

        Returns
        -------
        Trace

        Raises
        ------
        lazarus_core.routing.trace_format.TraceError
            A ValueError naming the file: not a trace, an unfinished capture, a missing, truncated or
            (with ``verify``) corrupt shard.
        """
        from lazarus_core.routing.trace_reader import load_trace

        trace = load_trace(trace_dir, verify=verify)
        if not self.spec:
            self.spec = trace.meta.get("tokenizer") or trace.meta.get("model")
        self.trace_model = trace.meta.get("model") or self.trace_model
        return trace

    # ------------------------------------------------------------------------------------ loading
    def load(self) -> "RoutingSession":
        """Load the model (once); returns self."""
        if self._model is not None:
            return self
        if not self.spec:
            raise ValueError("-m/--model is required (or --trace with a trace that names its model)")
        from lazarus_core.routing.loading import load_model
        from lazarus_core.routing.locate import find_moe_layers

        try:
            model, tokenizer, source = load_model(self.spec, revision=self.revision, device=self.device,
                                                  trust_remote_code=self.trust_remote_code)
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
        self._model, self.source_name = model, source.name
        if self._tokenizer is None:
            self._tokenizer = tokenizer
        self._info = find_moe_layers(model)
        return self

    @property
    def model(self):
        """The transformers causal LM (loaded on first use)."""
        return self.load()._model

    @property
    def tokenizer(self):
        """The tokenizer (loaded alone, without the model, when only it is needed)."""
        if self._tokenizer is None and not self.spec:
            raise ValueError("-m/--model is required")
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from lazarus_core.models.resolve import resolve_model

            source = resolve_model(self.spec, revision=self.revision)
            location = str(source.root) if source.root is not None else source.name
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(location, revision=self.revision)
            except (OSError, ValueError, TypeError) as exc:
                raise ValueError(f"-m {self.spec}: cannot load its tokenizer ({exc})") from None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value
        self._decoder = None

    @property
    def info(self):
        """:class:`lazarus_core.routing.MoeModelInfo` of the model."""
        return self.load()._info

    @property
    def classifier(self):
        """The :class:`lazarus_core.tokens.TokenClassifier` built from the lexicon options."""
        if self._classifier is None:
            from lazarus_core.tokens import TokenClassifier, load_lexicon
            from lazarus_core.tokens.pos import nltk_pos_tagger

            tagger = nltk_pos_tagger() if self.pos_tagger == "nltk" else None
            self._classifier = TokenClassifier(load_lexicon(self.lexicon, replace=self.lexicon_replace), tagger)
        return self._classifier

    @property
    def decoder(self):
        """A cached :class:`lazarus_core.tokens.PieceDecoder` for the tokenizer."""
        if self._decoder is None:
            from lazarus_core.tokens import PieceDecoder

            self._decoder = PieceDecoder(self.tokenizer)
        return self._decoder

    # ------------------------------------------------------------------------------------ routing
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens as the tokenizer adds them); empty text is a ValueError."""
        if not text or not text.strip():
            raise ValueError("the prompt is empty (-p)")
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError(f"the prompt {text!r} tokenises to zero tokens")
        return list(ids)

    def route_ids(self, ids: list[int], layers: list[int] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Routing of one sequence.

        Parameters
        ----------
        ids : list of int
            Token ids [n].
        layers : list of int, optional
            MoE layers (default all).

        Returns
        -------
        dict[int, (np.ndarray int32 [n, k], np.ndarray float32 [n, k])]
            Layer -> experts sorted by weight and their weights.
        """
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
    def trace(self, prompts: list[str], labels: list[str] | None = None, *, layers: list[int] | None = None,
              trace_dir: str | Path | None = None, save_to: str | Path | None = None, logits: bool = False,
              verify: bool = False):
        """A trace to analyse: ``trace_dir`` when given (reused), else a capture of ``prompts``.

        Parameters
        ----------
        prompts : list of str
            Documents to capture (ignored with ``trace_dir``).
        labels : list of str, optional
            One label per prompt (category or domain), stored beside the capture.
        layers : list of int, optional
            MoE layers to capture (default all).
        trace_dir : str or Path, optional
            An existing trace; the session's model defaults to the one it names.
        save_to : str or Path, optional
            Where to keep the capture (default a temporary directory that lives as long as the session).
        logits : bool
            Also capture the raw router logits.
        verify : bool
            With ``trace_dir``: check every shard's sha256 first (see :meth:`reuse_trace`).

        Returns
        -------
        (Trace, dict[int, str])
            The trace and its document labels (empty when it has none).
        """
        from lazarus_core.routing.capture import capture_routing
        from lazarus_core.routing.corpus import corpus_from_prompts
        from lazarus_core.routing.trace_reader import load_trace

        if trace_dir:
            return self.reuse_trace(trace_dir, verify=verify), read_doc_labels(trace_dir)
        out = save_to
        if out is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lazarus-trace-")
            out = Path(self._tmp.name) / "trace"
        capture_routing(self.model, self.tokenizer, corpus_from_prompts(prompts), out, layers=layers,
                        seq_len=512, batch_size=8, logits=logits, progress=False,
                        model_meta={"model": self.source_name, "tokenizer": self.spec})
        doc_labels = {i: l for i, l in enumerate(labels)} if labels else {}
        if labels:
            write_doc_labels(out, doc_labels)
        return load_trace(out), doc_labels
