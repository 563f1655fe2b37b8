"""What the trace-based analysis actions share: corpus flags, a trace with the fields they need, CSV and plot output."""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

from lazarus_core.atomic_io import atomic_path, atomic_write_json
from lazarus_core.cli.routing_common import LABELS_FILE, Session

DEFAULT_NUM_TOKENS = 4096


def add_analysis_flags(parser: argparse.ArgumentParser, *, num_tokens: int = DEFAULT_NUM_TOKENS) -> None:
    """``--num-tokens``, the corpus to capture when there is no ``--trace``, ``--plot FILE`` and ``--csv DIR``."""
    parser.add_argument("--num-tokens", type=int, default=num_tokens,
                        help=f"tokens to capture when no --trace is given (default {num_tokens}); with --trace, "
                             "use at most this many of its tokens where the analysis samples")
    parser.add_argument("--text", nargs="+", default=None, metavar="FILE", help="corpus: text files (without --trace)")
    parser.add_argument("--jsonl", default=None, metavar="FILE", help="corpus: JSON-lines file (without --trace)")
    parser.add_argument("--field", default="text", help="JSONL field holding the text (default text)")
    parser.add_argument("--label-field", default="category",
                        help="JSONL field giving each document's domain label (default category)")
    parser.add_argument("--plot", default=None, metavar="FILE", help="write a figure (.png or .pdf)")
    parser.add_argument("--csv", default=None, metavar="DIR", help="write the underlying tables as CSV files")


def default_corpus(args: argparse.Namespace, session: Session):
    """The corpus an analysis captures when no ``--trace`` is given, and its document labels.

    ``--text`` / ``--jsonl`` when given; else a built-in model's shipped held-out documents
    (``heldout.jsonl``, labelled by category); else the taxonomy prompts (labelled by category).

    Returns
    -------
    (Corpus, list of str or None)
    """
    from lazarus_core.models.builtin import resolve_builtin
    from lazarus_core.routing.corpus import corpus_from_jsonl, corpus_from_prompts, corpus_from_texts

    jsonl = getattr(args, "jsonl", None)
    if getattr(args, "text", None):
        return corpus_from_texts(args.text), None
    if jsonl is None and session.spec:
        builtin = resolve_builtin(session.spec)
        if builtin is not None and (builtin / "heldout.jsonl").is_file():
            jsonl = builtin / "heldout.jsonl"
            args.field = "text"
    if jsonl is not None:
        corpus = corpus_from_jsonl(jsonl, getattr(args, "field", "text"))
        return corpus, jsonl_labels(Path(jsonl), getattr(args, "field", "text"), getattr(args, "label_field", "category"))
    from lazarus_core.trigram.prompts import resolve_categories, taxonomy_corpus

    texts, labels = taxonomy_corpus(resolve_categories(getattr(args, "categories", None)), 12, getattr(args, "seed", 0))
    return corpus_from_prompts(texts), labels


def jsonl_labels(path: str | os.PathLike, field: str, label_field: str) -> list[str] | None:
    """Labels of the non-empty records of a JSONL corpus, in document order (None when a record lacks one)."""
    path, labels = Path(path), []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if not str(record.get(field, "")).strip():
                continue
            if label_field not in record:
                return None
            labels.append(str(record[label_field]))
    return labels


def analysis_trace(args: argparse.Namespace, session: Session, *, logits: bool = False, hidden_states: bool = False,
                   expert_outputs: bool = False, all_experts: bool = False, sample_tokens: int | None = None,
                   layers: list[int] | None = None):
    """The trace an analysis runs on: ``--trace DIR`` (checked for the fields asked for) or a fresh capture.

    With ``--verify`` every shard of ``--trace`` is checked against its sha256 first.

    A fresh capture records ``--num-tokens`` tokens of :func:`default_corpus` with exactly the fields
    asked for, into ``--save-trace DIR`` or a temporary directory kept alive by ``session``.

    Returns
    -------
    (Trace, dict[int, str])
        The trace and its document labels (empty when it has none).

    Raises
    ------
    ValueError
        The given trace lacks a field the analysis needs (the message names the capture flag), or is
        not a sound trace (a TraceError naming the file: e.g. a shard that fails ``--verify``).
    """
    from lazarus_core.routing.capture import capture_routing
    from lazarus_core.routing.trace_reader import load_trace

    if getattr(args, "trace", None):
        trace = session.reuse_trace(args.trace, verify=getattr(args, "verify", False))
        require_fields(trace, logits=logits, hidden_states=hidden_states, expert_outputs=expert_outputs,
                       all_experts=all_experts)
        labels_path = Path(args.trace) / LABELS_FILE
        labels = ({int(k): v for k, v in json.loads(labels_path.read_text()).items()} if labels_path.is_file() else {})
        return trace, labels
    corpus, labels = default_corpus(args, session)
    out = getattr(args, "save_trace", None)
    if out is None:
        session._tmp = tempfile.TemporaryDirectory(prefix="lazarus-trace-")
        out = Path(session._tmp.name) / "trace"
    capture_routing(session.model, session.tokenizer, corpus, out, layers=layers, seq_len=512, batch_size=8,
                    max_tokens=getattr(args, "num_tokens", DEFAULT_NUM_TOKENS), logits=logits,
                    hidden_states=hidden_states, expert_outputs=expert_outputs, all_experts=all_experts,
                    sample_tokens=sample_tokens, seed=getattr(args, "seed", 0), progress=False,
                    model_meta={"model": session.source_name, "tokenizer": session.spec})
    doc_labels = {i: l for i, l in enumerate(labels)} if labels else {}
    if doc_labels:
        atomic_write_json(Path(out) / LABELS_FILE, {str(k): v for k, v in doc_labels.items()})
    return load_trace(out), doc_labels


def require_fields(trace, *, logits: bool = False, hidden_states: bool = False, expert_outputs: bool = False,
                   all_experts: bool = False) -> None:
    """Raise a one-line ValueError naming the ``lazarus capture`` flag when ``trace`` lacks a needed field."""
    missing = [(need, flag) for need, have, flag in (
        (logits, trace.has_logits, "--logits"),
        (hidden_states, trace.has_hidden, "--hidden-states"),
        (expert_outputs, trace.has_expert_outputs, "--expert-outputs"),
        (all_experts, trace.has_all_expert_outputs, "--all-experts"),
    ) if need and not have]
    if missing:
        flags = " ".join(flag for _, flag in missing)
        raise ValueError(f"the trace {trace.path} was captured without {flags}: recapture it with "
                         f"`lazarus capture ... {flags}` (or omit --trace to capture on the fly)")


def write_csv_tables(args: argparse.Namespace, tables: dict[str, list[dict]]) -> list[Path]:
    """Write each table (a list of flat dict rows) to ``--csv DIR/<name>.csv`` atomically; returns the paths."""
    directory = getattr(args, "csv", None)
    if not directory:
        return []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in tables.items():
        path = directory / f"{name}.csv"
        columns: list[str] = []
        for row in rows:
            columns.extend(c for c in row if c not in columns)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    return paths


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure to ``path`` (format from the suffix: .png or .pdf) atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"--plot {path}: use a .png, .pdf or .svg file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix[1:].lower())
    finally:
        plt.close(fig)
    return path
