"""Token types and trigram ids for every token of a trace (or of a prompt), as integer arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lazarus_core.tokens import PieceDecoder, TokenClassifier, TokenTypes
from lazarus_core.tokens.types import END, NUM_TYPES, START, TYPE_ID


def sequence_edges(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each sequence the model saw starts and ends.

    Parameters
    ----------
    positions : np.ndarray
        int [N], 0 at the first token of each sequence (trace ``positions``).

    Returns
    -------
    (first bool [N], last bool [N])
    """
    first = np.asarray(positions) == 0
    if len(first):
        first[0] = True
    last = np.empty_like(first)
    last[:-1] = first[1:]
    if len(last):
        last[-1] = True
    return first, last


def trigram_ids(types: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Trigram id per token: ``(prev * T + cur) * T + next`` with ``^``/``$`` at sequence edges.

    Parameters
    ----------
    types : np.ndarray
        int [N], type ids (``lazarus_core.tokens.types.TYPE_ID``).
    positions : np.ndarray
        int [N], 0 at each sequence start.

    Returns
    -------
    np.ndarray
        int32 [N]; decode with :func:`lazarus_core.tokens.trigram_name`.
    """
    types = np.asarray(types, dtype=np.int32)
    first, last = sequence_edges(positions)
    prev = np.roll(types, 1)
    prev[first] = TYPE_ID[START]
    nxt = np.roll(types, -1)
    nxt[last] = TYPE_ID[END]
    return (prev * NUM_TYPES + types) * NUM_TYPES + nxt


@dataclass
class TokenLabels:
    """Types of every token of a trace in both views.

    Attributes
    ----------
    semantic, structural : np.ndarray
        int16 [N] type ids.
    positions : np.ndarray
        int32 [N] (sequence starts at 0).
    """

    semantic: np.ndarray
    structural: np.ndarray
    positions: np.ndarray

    def types(self, view: str) -> np.ndarray:
        if view not in ("semantic", "structural"):
            raise ValueError(f"--view must be semantic or structural, got {view!r}")
        return self.semantic if view == "semantic" else self.structural

    def trigrams(self, view: str) -> np.ndarray:
        """int32 [N] trigram ids of ``view``."""
        return trigram_ids(self.types(view), self.positions)


def encode_types(types: TokenTypes) -> tuple[np.ndarray, np.ndarray]:
    """(semantic int16 [n], structural int16 [n]) type ids of one classified sequence."""
    return (np.array([TYPE_ID[t] for t in types.semantic], dtype=np.int16),
            np.array([TYPE_ID[t] for t in types.structural], dtype=np.int16))


def label_tokens(token_ids: np.ndarray, doc_ids: np.ndarray, positions: np.ndarray, tokenizer,
                 classifier: TokenClassifier) -> TokenLabels:
    """Classify every token of a trace document by document (sub-word pieces see their whole word).

    Parameters
    ----------
    token_ids, doc_ids, positions : np.ndarray
        int [N] each, as stored in a trace.
    tokenizer : transformers tokenizer
        The tokenizer the trace was captured with.
    classifier : TokenClassifier

    Returns
    -------
    TokenLabels
    """
    decoder = PieceDecoder(tokenizer)
    n = len(token_ids)
    sem = np.empty(n, dtype=np.int16)
    struct = np.empty(n, dtype=np.int16)
    cuts = np.flatnonzero(np.diff(np.asarray(doc_ids)) != 0) + 1
    bounds = np.concatenate([[0], cuts, [n]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            s, t = encode_types(decoder.classify_ids(classifier, token_ids[a:b]))
            sem[a:b], struct[a:b] = s, t
    return TokenLabels(sem, struct, np.asarray(positions, dtype=np.int32))


def label_trace(trace, tokenizer, classifier: TokenClassifier) -> TokenLabels:
    """:func:`label_tokens` over a whole :class:`lazarus_core.routing.Trace`."""
    return label_tokens(trace.token_ids, trace.doc_ids, trace.positions, tokenizer, classifier)
