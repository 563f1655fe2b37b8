"""Turn token ids back into the exact text each token stands for (byte-level BPE, SentencePiece, WordPiece)."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from lazarus_core.tokens.classifier import TokenClassifier, TokenTypes, piece_text


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` table (byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class PieceDecoder:
    """id -> token text (markers resolved), cached per id, plus special-token flags.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Any Hugging Face tokenizer with ``convert_ids_to_tokens`` and ``all_special_ids``.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special_ids = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        sample = list(vocab)[:2000]
        self.byte_level = any("Ġ" in t for t in sample) or any("Ċ" in t for t in sample)
        # A word-level vocabulary (no space markers at all): its pieces are whole words, spaced apart.
        self.word_level = bool(sample) and not self.byte_level and not any(
            "▁" in t or t.startswith("##") for t in sample)
        self._cache: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        """The text of one token (``'Ġas'`` -> ``' as'``; byte-level pieces decoded as UTF-8, lossy on split characters)."""
        token_id = int(token_id)
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the tokenizer's vocabulary")
        if self.byte_level and token_id not in self.special_ids:
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                out = bytes(table[c] for c in piece).decode("utf-8", errors="replace")
            else:
                out = piece_text(piece)
        elif self.word_level and token_id not in self.special_ids:
            out = " " + piece
        else:
            out = piece_text(piece)
        self._cache[token_id] = out
        return out

    def classify_ids(self, classifier: TokenClassifier, ids: Sequence[int] | np.ndarray) -> TokenTypes:
        """Classify one sequence of token ids (sub-word pieces joined into words through their offsets)."""
        ids = [int(i) for i in ids]
        texts = [self.text(i) for i in ids]
        special = [i in self.special_ids for i in ids]
        offsets, pos = [], 0
        for t, s in zip(texts, special):
            n = 0 if s else len(t)
            offsets.append((pos, pos + n))
            pos += n
        text = "".join(t for t, s in zip(texts, special) if not s)
        return classifier.classify_spans(text, offsets, special)
