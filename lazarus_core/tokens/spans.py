"""Cut text into lexical spans (words, numbers, operators, brackets, punctuation, whitespace) and mark code lines."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Order matters: numbers (with a sign only where it cannot be a binary operator) before operators.
_SPAN_RE = re.compile(r"""
    (?P<NUM>(?:(?<![\w)\].])[-+](?=\d))?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?)
  | (?P<NUMDOT>(?<![\w.])\.\d+)
  | (?P<WORD>[^\W\d]\w*(?:'\w+)?)
  | (?P<OP>==|!=|<=|>=|->|=>|\*\*|//|\+=|-=|\*=|/=|&&|\|\||<<|>>|:=|[-+*/=<>%^&|~])
  | (?P<BR>[()\[\]{}])
  | (?P<WS>\s+)
  | (?P<PN>.)
""", re.VERBOSE | re.DOTALL)

_CODE_START = re.compile(r"^\s*(def|class|import|from\s+\S+\s+import|return|elif|else\s*:|try\s*:|except\b|finally\s*:"
                         r"|for\s+\w+(\s*,\s*\w+)*\s+in\b.*:\s*$|while\b.*:\s*$|if\b.*:\s*$|with\b.*:\s*$|@\w+"
                         r"|#include|function\b|var\s|let\s|const\s|public\s|private\s|static\s)")
_CODE_SIGNS = (re.compile(r"[A-Za-z_]\w*\s*\([^)]*\)"),             # call or signature: name(...)
               re.compile(r"[;{}]\s*$"),                              # C-family line end
               re.compile(r"^\s*[A-Za-z_][\w.\[\]]*\s*(=|\+=|-=|:=)\s*\S"),  # assignment to an identifier
               re.compile(r"\b[a-z]+_[a-z_]+\b|\b\w+\.\w+\("),         # snake_case or method call
               re.compile(r"==|!=|->|=>|\*\*|&&|\|\|"),
               re.compile(r"^( {4}|\t)\S"),                          # indented block
               re.compile(r"^\s*#\s"))                               # comment line


@dataclass(frozen=True)
class Span:
    """A lexical unit of the text: ``text[start:end]`` of ``kind`` (NUM, WORD, OP, BR, WS, PN); ``code`` if on a code line."""

    start: int
    end: int
    kind: str
    text: str
    code: bool


def is_code_line(line: str) -> bool:
    """Heuristic: does ``line`` read as source code rather than prose?

    A line is code if it starts like a statement (``def``, ``class``, ``import``, ``return``, a
    block header ending in ``:`` ...) or shows two code signs (a call ``f(x)``, ``;``/``{}`` at the end,
    an assignment to an identifier, snake_case, ``==``/``->``, an indented block, a ``#`` comment).
    Prose with a marker word ("if it rains, ...") shows none of these.
    """
    if not line.strip():
        return False
    if _CODE_START.search(line):
        return True
    return sum(1 for sign in _CODE_SIGNS if sign.search(line)) >= 2


def code_line_mask(text: str) -> list[tuple[int, int, bool]]:
    """``(start, end, is_code)`` for each line of ``text``; a short document that is mostly code is all code.

    Lines inside a mostly-code document (over half its non-empty lines are code) count as code too, so a
    bare ``x = y`` continuation or a closing ``)`` line in a function is not read as prose.
    """
    lines, start = [], 0
    for line in text.splitlines(keepends=True):
        lines.append((start, start + len(line), is_code_line(line)))
        start += len(line)
    if not lines:
        return [(0, len(text), False)]
    nonempty = [(s, e, c) for s, e, c in lines if text[s:e].strip()]
    if nonempty and sum(c for _, _, c in nonempty) * 2 > len(nonempty):
        return [(s, e, True) for s, e, _ in lines]
    return lines


_PROSE_IN_CODE = re.compile(r"""#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'""")


def _prose_ranges(text: str, lines: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
    """Comment and string-literal contents on code lines: their words are prose, not identifiers."""
    out = []
    for start, end, code in lines:
        if code:
            for m in _PROSE_IN_CODE.finditer(text, start, end):
                out.append((m.start() + 1, m.end() - (0 if m.group().startswith("#") else 1)))
    return out


def split_spans(text: str) -> list[Span]:
    """Cut ``text`` into contiguous :class:`Span` objects that cover it exactly, in order.

    A span is ``code`` when it sits on a code line outside comments and string literals.
    """
    lines = code_line_mask(text)
    prose = _prose_ranges(text, lines)
    spans, li, pi = [], 0, 0
    for m in _SPAN_RE.finditer(text):
        while li < len(lines) - 1 and m.start() >= lines[li][1]:
            li += 1
        while pi < len(prose) and m.start() >= prose[pi][1]:
            pi += 1
        in_prose = pi < len(prose) and prose[pi][0] <= m.start() < prose[pi][1]
        kind = "NUM" if m.lastgroup == "NUMDOT" else m.lastgroup
        spans.append(Span(m.start(), m.end(), kind, m.group(), lines[li][2] and not in_prose))
    return spans
