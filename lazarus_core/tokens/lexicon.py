"""Word lists behind the token types, read from data files a user can extend or replace (``--lexicon FILE``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

from lazarus_core.tokens.types import MARKER_TYPES, POS_TYPES

#: Shipped files, in package data ``lazarus_core/tokens/data``.
SHIPPED_FILES = ("markers.txt", "function_words.txt", "keywords.txt", "nouns.txt", "verbs.txt", "adjectives.txt")
#: Types a lexicon file may declare with a ``[TYPE]`` header.
LEXICON_TYPES = (*MARKER_TYPES, "NUM", "OP", "FUNC", "KW", *POS_TYPES)


@dataclass
class Lexicon:
    """Lower-case word sets per type.

    Attributes
    ----------
    words : dict[str, set[str]]
        Type code (one of ``LEXICON_TYPES``) -> words.
    sources : list of str
        Files read, in order.
    """

    words: dict[str, set[str]] = field(default_factory=lambda: {t: set() for t in LEXICON_TYPES})
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rebuild()

    def _rebuild(self) -> None:
        # Precedence among types for a word listed under several: markers, number and operator words,
        # FUNC, then KW, then POS.
        self.marker_of: dict[str, str] = {}
        for t in (*MARKER_TYPES, "NUM", "OP"):
            for w in self.words.get(t, ()):
                self.marker_of.setdefault(w, t)
        self.function_words = set(self.words.get("FUNC", ()))
        self.keywords = set(self.words.get("KW", ()))
        self.pos_of: dict[str, set[str]] = {}
        for t in POS_TYPES:
            for w in self.words.get(t, ()):
                self.pos_of.setdefault(w, set()).add(t)

    def add(self, type_code: str, words: Iterable[str]) -> None:
        """Add ``words`` under ``type_code`` (a ``LEXICON_TYPES`` code; ValueError otherwise)."""
        if type_code not in LEXICON_TYPES:
            raise ValueError(f"unknown lexicon type [{type_code}]; types are {', '.join(LEXICON_TYPES)}")
        self.words.setdefault(type_code, set()).update(w.lower() for w in words)
        self._rebuild()

    def update_from_file(self, path: str | Path) -> "Lexicon":
        """Add the words of a lexicon file (format: ``[TYPE]`` headers, then words; ``#`` comments).

        Raises
        ------
        FileNotFoundError
            ``--lexicon`` file missing.
        ValueError
            Words before the first header, or an unknown ``[TYPE]``; the message names file and line.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--lexicon file {path} does not exist")
        self._parse(path.read_text(encoding="utf-8"), str(path))
        return self

    def _parse(self, text: str, name: str) -> None:
        current = None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1].strip().upper()
                if current not in LEXICON_TYPES:
                    raise ValueError(f"{name}:{number}: unknown lexicon type [{current}]; "
                                     f"types are {', '.join(LEXICON_TYPES)}")
                continue
            if current is None:
                raise ValueError(f"{name}:{number}: words before the first [TYPE] header")
            self.words.setdefault(current, set()).update(w.lower() for w in line.split())
        self.sources.append(name)
        self._rebuild()

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "sizes": {t: len(w) for t, w in self.words.items()}}


def default_lexicon() -> Lexicon:
    """The shipped lexicon (markers, function words, code keywords, common nouns, verbs and adjectives)."""
    lex = Lexicon()
    data = resources.files("lazarus_core.tokens") / "data"
    for name in SHIPPED_FILES:
        lex._parse((data / name).read_text(encoding="utf-8"), f"lazarus_core/tokens/data/{name}")
    return lex


def load_lexicon(paths: Iterable[str | Path] = (), *, replace: bool = False) -> Lexicon:
    """The shipped lexicon extended by ``paths`` (or only ``paths`` when ``replace``).

    Parameters
    ----------
    paths : iterable of str or Path
        Lexicon files (``--lexicon FILE``), applied in order.
    replace : bool
        Start from an empty lexicon instead of the shipped one.
    """
    lex = Lexicon() if replace else default_lexicon()
    for p in paths:
        lex.update_from_file(p)
    return lex
