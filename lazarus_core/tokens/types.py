"""The token-type codes of both views (structural and semantic) and their integer ids for vectorised trigrams."""

from __future__ import annotations

START = "^"
END = "$"
SPECIAL = "SP"

#: Structural view: lexical shape and syntactic role (the reference toolkit's 10 types, plus VAR and WS).
STRUCTURAL_TYPES: tuple[str, ...] = ("FW", "CW", "NUM", "PN", "OP", "BR", "CAP", "KW", "VAR", "WS", SPECIAL)
STRUCTURAL_DESCRIPTIONS = {
    "FW": "function word (the, is, of, to, as, if, not ...)", "CW": "content word (lower case)",
    "NUM": "number (42, 3.14, -2, 1e-3)", "PN": "punctuation", "OP": "operator (+ - * / = == ...)",
    "BR": "bracket", "CAP": "capitalised content word (Paris, King)", "KW": "code keyword (in code)",
    "VAR": "identifier (in code)", "WS": "whitespace", SPECIAL: "special token (BOS, EOS, ...)",
}

#: Marker types: closed-class words that signal a relation (they win over code keywords in prose).
MARKER_TYPES: tuple[str, ...] = ("AS", "TO", "SYN", "ANT", "THAN", "CAUSE", "COND", "QW", "NEG", "TIME", "QUANT",
                                 "COORD")
#: Open-class types from the POS lexicons (or an optional POS tagger).
POS_TYPES: tuple[str, ...] = ("NOUN", "VERB", "ADJ")

#: Semantic view: relation markers, parts of speech, and the lexical classes.
SEMANTIC_TYPES: tuple[str, ...] = ("NUM", "OP", "KW", "VAR", *POS_TYPES, "FUNC", *MARKER_TYPES, "CAP", "CW", "BR",
                                   "PN", "WS", SPECIAL)
SEMANTIC_DESCRIPTIONS = {
    "NUM": "number (digits, and number words: two, twelve)", "OP": "operator (symbols; plus/minus/times as words)", "KW": "code keyword (in code)",
    "VAR": "identifier (in code)", "NOUN": "noun (lexicon)", "VERB": "verb (lexicon)", "ADJ": "adjective (lexicon)",
    "FUNC": "function word", "AS": "analogy marker 'as'", "TO": "'to'", "SYN": "synonym marker (means, equals)",
    "ANT": "antonym marker (versus, opposite)", "THAN": "comparison marker 'than'",
    "CAUSE": "causation marker (because, so)", "COND": "conditional marker (if, unless)",
    "QW": "question word (what, where)", "NEG": "negation (not, no, never)", "TIME": "temporal word (before, then)",
    "QUANT": "quantifier (all, some, every)", "COORD": "coordinator (and, or, but)",
    "CAP": "capitalised word not in the lexicons (names)", "CW": "other content word (not in the lexicons)",
    "BR": "bracket", "PN": "punctuation", "WS": "whitespace", SPECIAL: "special token",
}

VIEWS = ("semantic", "structural")

#: One id space for every code of both views and the sequence edges, so trigram ids are views-independent.
ALL_TYPES: tuple[str, ...] = tuple(dict.fromkeys((START, END, *STRUCTURAL_TYPES, *SEMANTIC_TYPES)))
TYPE_ID: dict[str, int] = {t: i for i, t in enumerate(ALL_TYPES)}
NUM_TYPES = len(ALL_TYPES)


def types_of_view(view: str) -> tuple[str, ...]:
    """The codes of ``view`` ('semantic' or 'structural'); raises ValueError naming the valid views."""
    if view == "semantic":
        return SEMANTIC_TYPES
    if view == "structural":
        return STRUCTURAL_TYPES
    raise ValueError(f"--view must be one of {', '.join(VIEWS)}, got {view!r}")


def trigram_name(trigram_id: int) -> str:
    """``'PREV→CUR→NEXT'`` for a trigram id ``(prev * T + cur) * T + next`` with ``T = NUM_TYPES``."""
    prev, rest = divmod(int(trigram_id), NUM_TYPES * NUM_TYPES)
    cur, nxt = divmod(rest, NUM_TYPES)
    return f"{ALL_TYPES[prev]}→{ALL_TYPES[cur]}→{ALL_TYPES[nxt]}"


def trigram_id(prev: str, cur: str, nxt: str) -> int:
    """Inverse of :func:`trigram_name` (accepts ``->`` or ``→`` separated names via :func:`parse_trigram`)."""
    return (TYPE_ID[prev] * NUM_TYPES + TYPE_ID[cur]) * NUM_TYPES + TYPE_ID[nxt]


def parse_trigram(text: str) -> int:
    """``'NUM→OP→NUM'`` or ``'NUM->OP->NUM'`` -> trigram id; raises ValueError naming unknown codes."""
    parts = [p.strip() for p in text.replace("->", "→").split("→")]
    if len(parts) != 3:
        raise ValueError(f"a trigram has three types separated by → or ->, got {text!r}")
    unknown = [p for p in parts if p not in TYPE_ID]
    if unknown:
        raise ValueError(f"unknown token type(s) {unknown} in trigram {text!r}; types are {', '.join(ALL_TYPES)}")
    return trigram_id(*parts)
