"""Turn text files, a JSONL field or prompts into documents, and documents into the sequences a model sees."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence


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


def corpus_from_iterable(texts: Iterable[str], *, source: str = "iterable") -> Corpus:
    """One document per item of any iterable of strings (a list, a generator, a ``datasets`` column).

    The iterable is read once; empty or whitespace-only items are skipped and counted.

    Raises
    ------
    TypeError
        An item is not a string (the message gives its index).
    EmptyInputError
        No non-empty item.
    """
    if isinstance(texts, str):
        raise TypeError("capture_routing: corpus is a single string; pass a list of documents")
    kept, sources, skipped = [], [], 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{source} item {i} is {type(text).__name__}, not a string")
        if not text.strip():
            skipped += 1
            continue
        kept.append(text)
        sources.append(f"{source}:{i}")
    if not kept:
        raise EmptyInputError(f"{source} has no non-empty text: nothing to capture")
    return Corpus(kept, sources, skipped)


def corpus_from_dataset(name_or_path: str, field_name: str, *, split: str = "train",
                        label_field: str | None = None) -> tuple[Corpus, list[str] | None]:
    """One document per record of a Hugging Face ``datasets`` dataset (local files or the hub cache).

    A local ``.parquet``, ``.jsonl``/``.json``, ``.csv`` or ``.txt`` file (or a directory of them) is read
    with the matching ``datasets`` builder; anything else is passed to ``datasets.load_dataset`` as a
    dataset name (downloaded through the hub cache; ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``
    are respected).

    Parameters
    ----------
    name_or_path : str
        Dataset name or local path.
    field_name : str
        Column holding the text.
    split : str
        Split to read (default ``train``; a local file has only ``train``).
    label_field : str, optional
        Column holding a per-document label (domain); returned in document order when present.

    Returns
    -------
    (Corpus, list of str or None)

    Raises
    ------
    ImportError
        ``datasets`` is not installed (the message says ``pip install "lazarus-core[datasets]"``).
    ValueError
        The split or the field does not exist (the message lists the choices), or no record has text.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError('--dataset needs the optional package `datasets`: pip install "lazarus-core[datasets]"') from None
    path = Path(name_or_path)
    builders = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
    try:
        if path.exists():
            files = sorted(p for p in path.iterdir() if p.suffix in builders) if path.is_dir() else [path]
            if not files or files[0].suffix not in builders:
                raise ValueError(f"--dataset {path}: no {', '.join(builders)} file to read")
            ds = datasets.load_dataset(builders[files[0].suffix], data_files=[str(f) for f in files], split=split)
        else:
            ds = datasets.load_dataset(name_or_path, split=split)
    except (FileNotFoundError, ConnectionError) as exc:
        raise ValueError(f"--dataset {name_or_path}: cannot load it ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"--dataset {name_or_path} --split {split}: {exc}") from None
    if field_name not in ds.column_names:
        raise ValueError(f"--dataset {name_or_path} has no field {field_name!r} (--field); its columns are "
                         f"{', '.join(ds.column_names)}")
    texts = ds[field_name]
    corpus = corpus_from_iterable(texts, source=str(name_or_path))
    labels = None
    if label_field and label_field in ds.column_names:
        raw = ds[label_field]
        labels = [str(raw[i]) for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    return corpus, labels


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
