"""Classify tokens of real tokenizer output into the structural and the semantic view, word by word."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Sequence

from lazarus_core.tokens.lexicon import Lexicon, default_lexicon
from lazarus_core.tokens.spans import Span, split_spans
from lazarus_core.tokens.types import END, SPECIAL, START

#: An optional part-of-speech tagger: words -> one of NOUN/VERB/ADJ (or None: fall back to the lexicon).
PosTagger = Callable[[Sequence[str]], Sequence["str | None"]]

_DETERMINERS = {"the", "a", "an", "this", "that", "these", "those", "my", "your", "his", "her", "its", "our",
                "their", "every", "each", "some", "any", "no"}
_VERB_CUES = {"to", "will", "would", "can", "could", "should", "must", "may", "might", "i", "you", "we", "they",
              "he", "she", "it", "did", "do", "does", "not"}
_CLOSED_MARKERS = {"AS", "TO", "THAN", "CAUSE", "COND", "QW", "NEG", "TIME", "QUANT", "COORD"}
_NOUN_SUFFIXES = ("tion", "sion", "ness", "ment", "ity", "ship", "hood", "ism", "ist", "ance", "ence")
_VERB_SUFFIXES = ("ize", "ise", "ify", "ate")
_ADJ_SUFFIXES = ("ous", "ful", "ive", "able", "ible", "less", "ical", "ish", "ary", "ly")


@dataclass
class TokenTypes:
    """Types of each token of one sequence in both views.

    Attributes
    ----------
    tokens : list of str
        The token text (BPE markers turned into spaces), one per token.
    words : list of str
        The word (or span) each token was classified by; sub-word pieces share their word.
    semantic, structural : list of str
        Type codes (``lazarus_core.tokens.types``), one per token.
    code : list of bool
        Whether the token sits on a line read as code.
    """

    tokens: list[str]
    words: list[str]
    semantic: list[str]
    structural: list[str]
    code: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def view(self, name: str) -> list[str]:
        """The types of view ``name`` ('semantic' or 'structural')."""
        if name not in ("semantic", "structural"):
            raise ValueError(f"--view must be semantic or structural, got {name!r}")
        return self.semantic if name == "semantic" else self.structural

    def trigrams(self, view: str = "semantic") -> list[str]:
        """``'PREV→CUR→NEXT'`` per token, ``^`` / ``$`` at the sequence edges."""
        t = self.view(view)
        return [f"{t[i - 1] if i else START}→{t[i]}→{t[i + 1] if i + 1 < len(t) else END}" for i in range(len(t))]

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "words": self.words, "semantic": self.semantic, "structural": self.structural,
                "code": self.code, "semantic_trigrams": self.trigrams("semantic"),
                "structural_trigrams": self.trigrams("structural")}


class TokenClassifier:
    """Token-type classifier (both views) over text with token offsets.

    Rules (DESIGN.md section 7): BPE space markers are stripped before any test; a sub-word piece takes
    the type of the word it belongs to (found through character offsets); decimals, exponents and
    signed numbers are NUM (a sign only where it cannot be a binary operator: ``-2``, ``x = -2`` but
    not ``5 - 2``); relation markers (as, to, if, not, because ...) win over code keywords in prose,
    while on a code line a keyword is KW and other identifiers are VAR.

    Parameters
    ----------
    lexicon : Lexicon, optional
        Word lists (default: the shipped lexicon).
    pos_tagger : callable, optional
        ``words -> [NOUN|VERB|ADJ|None]``, consulted before the POS lexicon for prose words that are
        not markers or function words. Off by default (no model download).
    """

    def __init__(self, lexicon: Lexicon | None = None, pos_tagger: PosTagger | None = None) -> None:
        self.lexicon = lexicon if lexicon is not None else default_lexicon()
        self.pos_tagger = pos_tagger

    # -- words -----------------------------------------------------------------------------------
    def _pos(self, word: str, prev: str | None) -> str | None:
        lex = self.lexicon
        candidates = lex.pos_of.get(word)
        if candidates is None:
            for stem in _stems(word):
                candidates = lex.pos_of.get(stem)
                if candidates is not None:
                    break
        if candidates:
            if len(candidates) == 1:
                return next(iter(candidates))
            if prev in _DETERMINERS and "NOUN" in candidates:
                return "NOUN"
            if prev in _VERB_CUES and "VERB" in candidates:
                return "VERB"
            return next(t for t in ("ADJ", "NOUN", "VERB") if t in candidates)
        if len(word) > 4:
            for suffixes, tag in ((_NOUN_SUFFIXES, "NOUN"), (_VERB_SUFFIXES, "VERB"), (_ADJ_SUFFIXES, "ADJ")):
                if word.endswith(suffixes):
                    return tag
        return None

    def classify_word(self, word: str, *, code: bool = False, prev: str | None = None,
                      tagged: str | None = None) -> tuple[str, str]:
        """(semantic, structural) type of one word (letters/digits/underscore).

        Parameters
        ----------
        word : str
            The word as written (case kept: it decides CAP).
        code : bool
            The word sits on a code line.
        prev : str, optional
            The previous word, lower case (disambiguates noun/verb homographs).
        tagged : str, optional
            A POS tagger's answer for this word.
        """
        lex = self.lexicon
        low = word.lower()
        capitalised = word[:1].isupper()
        if code and (word in lex.keywords or low in ("none", "true", "false") and word[:1].isupper()):
            return "KW", "KW"
        if code:
            return "VAR", "VAR"
        marker = lex.marker_of.get(low) or ("NEG" if low.endswith("n't") else None)
        if marker is not None:
            return marker, ("FW" if marker in _CLOSED_MARKERS else ("OP" if marker == "OP" else "CAP" if capitalised else "CW"))
        if low in lex.function_words:
            return "FUNC", "FW"
        if "_" in word or (len(word) == 1 and low not in ("a", "i")):
            return "VAR", "VAR"
        pos = tagged if tagged in ("NOUN", "VERB", "ADJ") else self._pos(low, prev)
        structural = "CAP" if capitalised else "CW"
        if pos is not None:
            return pos, structural
        if word in lex.keywords:      # a keyword that is not an English word (def, elif, lambda) stays KW
            return "KW", "KW"
        return ("CAP" if capitalised else "CW"), structural

    # -- sequences ---------------------------------------------------------------------------------
    def classify_spans(self, text: str, offsets: Sequence[tuple[int, int]],
                       special: Sequence[bool] | None = None) -> TokenTypes:
        """Classify tokens given by character ``offsets`` into ``text``.

        Parameters
        ----------
        text : str
            The text the tokens cover.
        offsets : sequence of (int, int)
            ``[start, end)`` per token (as ``return_offsets_mapping`` gives); ``(0, 0)`` or a
            ``special`` flag marks a special token (type SP).
        special : sequence of bool, optional
            Special-token flags, one per token.

        Returns
        -------
        TokenTypes
        """
        spans = split_spans(text)
        span_types = self._span_types(spans)
        starts = [s.start for s in spans]
        tokens, words, sem, struct, code = [], [], [], [], []
        for i, (a, b) in enumerate(offsets):
            piece = text[a:b]
            tokens.append(piece)
            if (special is not None and special[i]) or (a == b):
                words.append(piece)
                sem.append(SPECIAL)
                struct.append(SPECIAL)
                code.append(False)
                continue
            stripped = len(piece) - len(piece.lstrip())
            if stripped == len(piece):          # whitespace only
                words.append(piece)
                sem.append("WS")
                struct.append("WS")
                code.append(False)
                continue
            j = bisect.bisect_right(starts, a + stripped) - 1
            span = spans[j]
            words.append(span.text)
            sem.append(span_types[j][0])
            struct.append(span_types[j][1])
            code.append(span.code)
        return TokenTypes(tokens, words, sem, struct, code)

    def _span_types(self, spans: list[Span]) -> list[tuple[str, str]]:
        word_spans = [s for s in spans if s.kind == "WORD"]
        tags: dict[int, str | None] = {}
        if self.pos_tagger is not None and word_spans:
            prose = [s for s in word_spans if not s.code]
            for s, tag in zip(prose, self.pos_tagger([s.text for s in prose])):
                tags[s.start] = tag
        out, prev = [], None
        for s in spans:
            if s.kind == "WORD":
                out.append(self.classify_word(s.text, code=s.code, prev=prev, tagged=tags.get(s.start)))
                prev = s.text.lower()
            elif s.kind == "WS":
                out.append(("WS", "WS"))
            else:
                out.append((s.kind, s.kind))
                prev = None if s.kind != "NUM" else prev
        return out

    def classify_pieces(self, pieces: Sequence[str], special: Sequence[bool] | None = None) -> TokenTypes:
        """Classify a sequence of token strings (BPE markers allowed: ``Ġ``, ``▁``, ``Ċ``, ``##``).

        The pieces are turned into text (markers -> spaces/newlines; ``##`` glues to the previous
        piece) and concatenated, so the offsets of each piece are known and sub-word pieces are
        classified by their word.
        """
        texts = [piece_text(p) for p in pieces]
        offsets, pos = [], 0
        for t in texts:
            offsets.append((pos, pos + len(t)))
            pos += len(t)
        flags = list(special) if special is not None else [False] * len(texts)
        flags = [f or not t for f, t in zip(flags, texts)]
        return self.classify_spans("".join(texts), offsets, flags)

    def classify_token(self, token: str, *, context: str = "prose") -> tuple[str, str]:
        """(semantic, structural) type of one token string in ``context`` ('prose' or 'code')."""
        if context not in ("prose", "code"):
            raise ValueError(f"context must be 'prose' or 'code', got {context!r}")
        text = piece_text(token)
        if context == "code":
            word = text.strip()
            if word and (word[0].isalpha() or word[0] == "_"):
                return self.classify_word(word, code=True)
        types = self.classify_pieces([token])
        return types.semantic[0], types.structural[0]

    def classify_text(self, text: str, tokenizer) -> TokenTypes:
        """Tokenise ``text`` with a fast tokenizer (special tokens added) and classify every token.

        Raises
        ------
        ValueError
            ``text`` is empty or whitespace only.
        """
        if not text or not text.strip():
            raise ValueError("the prompt is empty: nothing to classify")
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
        return self.classify_spans(text, [tuple(o) for o in enc["offset_mapping"]],
                                   [bool(m) for m in enc["special_tokens_mask"]])


def _stems(word: str) -> list[str]:
    """Candidate base forms of an inflected word (plural, past, -ing, comparative/superlative)."""
    out = []
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("ier", "y"), ("iest", "y"), ("es", ""), ("s", ""), ("ed", ""),
                         ("ed", "e"), ("ing", ""), ("ing", "e"), ("er", ""), ("er", "e"), ("est", ""), ("est", "e"),
                         ("d", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 2:
            base = word[: len(word) - len(suffix)] + repl
            out.append(base)
            if len(base) > 2 and base[-1] == base[-2] and not repl:      # bigger -> bigg -> big
                out.append(base[:-1])
    return out


_BYTE_LEVEL_SPACE = {"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "▁": " "}


def piece_text(piece: str) -> str:
    """A token string with its BPE/SentencePiece markers turned into the text they stand for.

    ``'Ġas'`` -> ``' as'``, ``'▁not'`` -> ``' not'``, ``'Ċ'`` -> ``'\\n'``, ``'##ing'`` -> ``'ing'``,
    ``'<0x0A>'`` -> ``'\\n'``; plain text is returned unchanged.
    """
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        try:
            return chr(int(piece[3:5], 16))
        except ValueError:
            return piece
    if piece.startswith("##") and len(piece) > 2:
        return piece[2:]
    return "".join(_BYTE_LEVEL_SPACE.get(c, c) for c in piece)


__all__ = ["TokenClassifier", "TokenTypes", "piece_text", "PosTagger", "START", "END"]
