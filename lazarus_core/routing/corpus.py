"""Turn text files, a JSONL field or prompts into documents, and documents into the sequences a model sees."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence


class EmptyInputError(ValueError):
    """A text, prompt or corpus has no content to capture; the message names it."""


@dataclass
class Corpus:
    """Documents in order (their index is the trace's ``doc_id``) and where they came from.

    Attributes
    ----------
    texts : list of str
        Document texts.
    sources : list of str
        Origin of each document (``file``, ``file:line`` or ``prompt N``).
    skipped_empty : int
        JSONL records whose field was empty and were skipped.
    """

    texts: list[str]
    sources: list[str]
    skipped_empty: int = 0

    def fingerprint(self) -> str:
        """sha256 over the document texts (identifies the corpus when resuming)."""
        h = hashlib.sha256()
        for text in self.texts:
            h.update(text.encode())
            h.update(b"\x00")
        return h.hexdigest()

    def to_dict(self) -> dict:
        origin = sorted({s.split(":")[0] for s in self.sources})
        return {"num_documents": len(self.texts), "sources": origin, "skipped_empty": self.skipped_empty,
                "sha256": self.fingerprint()}


def corpus_from_texts(paths: Sequence[str | Path]) -> Corpus:
    """One document per text file (UTF-8).

    Raises
    ------
    FileNotFoundError
        A file does not exist.
    EmptyInputError
        A file is empty or whitespace only.
    """
    texts, sources = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"--text file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise EmptyInputError(f"--text file {path} is empty: nothing to capture")
        texts.append(text)
        sources.append(str(path))
    return Corpus(texts, sources)


def corpus_from_jsonl(path: str | Path, field_name: str) -> Corpus:
    """One document per JSONL record, taken from ``field_name``; records with an empty field are skipped.

    Raises
    ------
    FileNotFoundError, EmptyInputError, ValueError
        Missing file; no non-empty record; a line that is not JSON or lacks the field (named ``file:line``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--jsonl file {path} does not exist")
    texts, sources, skipped = [], [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field_name not in record:
                raise ValueError(f"{path}:{number} has no field {field_name!r} (--field)")
            text = record[field_name]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: field {field_name!r} is {type(text).__name__}, not a string")
            if not text.strip():
                skipped += 1
                continue
            texts.append(text)
            sources.append(f"{path}:{number}")
    if not texts:
        raise EmptyInputError(f"--jsonl file {path} has no non-empty {field_name!r} field: nothing to capture")
    return Corpus(texts, sources, skipped)


def corpus_from_prompts(prompts: Sequence[str]) -> Corpus:
    """One document per prompt.

    Raises
    ------
    EmptyInputError
        No prompt, or an empty prompt.
    """
    if not prompts:
        raise EmptyInputError("no prompt given: nothing to capture")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise EmptyInputError(f"prompt {i} (-p) is empty: nothing to capture")
    return Corpus(list(prompts), [f"prompt {i}" for i in range(len(prompts))])


@dataclass
class Window:
    """One window of a document as the model sees it: ``positions`` restart at 0 here."""

    doc_id: int
    token_ids: list[int] = field(default_factory=list)


def iter_windows(tokenize, texts: Sequence[str], seq_len: int, max_tokens: int | None = None) -> Iterator[Window]:
    """Split each tokenised document into windows of at most ``seq_len`` tokens, in order.

    Parameters
    ----------
    tokenize : callable
        ``str -> list[int]`` (special tokens as the tokenizer adds them).
    texts : sequence of str
        Documents; ``doc_id`` is the index.
    seq_len : int
        Longest window (>= 1).
    max_tokens : int, optional
        Stop once this many tokens were yielded (the last window is cut short).

    Raises
    ------
    EmptyInputError
        The documents hold no token at all.
    """
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
    total = 0
    for doc_id, text in enumerate(texts):
        ids = list(tokenize(text))
        for start in range(0, len(ids), seq_len):
            window = ids[start:start + seq_len]
            if max_tokens is not None:
                window = window[: max_tokens - total]
            total += len(window)
            yield Window(doc_id, window)
            if max_tokens is not None and total >= max_tokens:
                return
    if total == 0:
        raise EmptyInputError("the corpus tokenises to zero tokens: nothing to capture")
