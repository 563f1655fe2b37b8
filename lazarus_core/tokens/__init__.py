"""Token types for routing analysis: a structural and a semantic view of real tokenizer output."""

from lazarus_core.tokens.classifier import TokenClassifier, TokenTypes, piece_text
from lazarus_core.tokens.lexicon import Lexicon, default_lexicon, load_lexicon
from lazarus_core.tokens.pieces import PieceDecoder
from lazarus_core.tokens.pos import nltk_pos_tagger
from lazarus_core.tokens.types import (ALL_TYPES, NUM_TYPES, SEMANTIC_TYPES, STRUCTURAL_TYPES, TYPE_ID, VIEWS,
                                       parse_trigram, trigram_id, trigram_name, types_of_view)

__all__ = ["TokenClassifier", "TokenTypes", "piece_text", "Lexicon", "default_lexicon", "load_lexicon",
           "PieceDecoder", "nltk_pos_tagger", "ALL_TYPES", "NUM_TYPES", "SEMANTIC_TYPES", "STRUCTURAL_TYPES",
           "TYPE_ID", "VIEWS", "parse_trigram", "trigram_id", "trigram_name", "types_of_view"]
