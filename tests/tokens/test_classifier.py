"""The token classifier on tricky tokens, sub-word pieces of a real BPE tokenizer, code vs prose, and lexicon files."""

from __future__ import annotations

import pytest

from lazarus_core.tokens import PieceDecoder, TokenClassifier, load_lexicon, piece_text
from lazarus_core.tokens.spans import is_code_line
from tests.tokens.bpe import tiny_bpe_tokenizer


@pytest.fixture(scope="module")
def clf():
    return TokenClassifier()


# (token, context, semantic, structural): hand-checked against the rules in DESIGN.md section 7.
TRICKY = [
    (" King", "prose", "NOUN", "CAP"),        # leading space stripped before the case test
    ("ĠKing", "prose", "NOUN", "CAP"),
    ("Ġas", "prose", "AS", "FW"),             # BPE marker stripped; marker word
    ("▁not", "prose", "NEG", "FW"),           # SentencePiece marker
    ("3.14", "prose", "NUM", "NUM"),          # decimal
    ("-2", "prose", "NUM", "NUM"),            # signed number
    ("1e-3", "prose", "NUM", "NUM"),
    ("if", "prose", "COND", "FW"),            # marker wins over the keyword in prose
    ("if", "code", "KW", "KW"),               # keyword in code
    ("as", "code", "KW", "KW"),
    ("means", "prose", "SYN", "CW"),
    ("versus", "prose", "ANT", "CW"),
    ("than", "prose", "THAN", "FW"),
    ("because", "prose", "CAUSE", "FW"),
    ("Where", "prose", "QW", "FW"),
    ("Paris", "prose", "CAP", "CAP"),         # unknown capitalised word
    ("The", "prose", "FUNC", "FW"),           # capitalised function word is not CAP
    ("bigger", "prose", "ADJ", "CW"),         # comparative of a lexicon adjective
    ("walked", "prose", "VERB", "CW"),
    ("dogs", "prose", "NOUN", "CW"),
    ("Ċ", "prose", "WS", "WS"),
    ("ĠĠ", "prose", "WS", "WS"),
    ("(", "prose", "BR", "BR"),
    ("==", "code", "OP", "OP"),
    ("+", "prose", "OP", "OP"),
    (",", "prose", "PN", "PN"),
    ("my_var", "code", "VAR", "VAR"),
    ("def", "prose", "KW", "KW"),             # not an English word: stays a keyword
    ("Six", "prose", "NUM", "CAP"),           # number word: semantic NUM, still a (capitalised) word
    ("plus", "prose", "OP", "OP"),
]


@pytest.mark.parametrize("token,context,semantic,structural", TRICKY, ids=[f"{t!r}-{c}" for t, c, *_ in TRICKY])
def test_tricky_tokens(clf, token, context, semantic, structural):
    assert clf.classify_token(token, context=context) == (semantic, structural)


def test_piece_text_strips_markers():
    assert piece_text("Ġas") == " as" and piece_text("▁not") == " not" and piece_text("Ċ") == "\n"
    assert piece_text("##ing") == "ing" and piece_text("<0x0A>") == "\n" and piece_text("plain") == "plain"


def test_analogy_sentence_trigrams_match_hand_labels(clf):
    t = clf.classify_pieces(["King", "Ġis", "Ġto", "Ġqueen", "Ġas", "Ġman", "Ġis", "Ġto", "Ġwoman"])
    assert t.semantic == ["NOUN", "FUNC", "TO", "NOUN", "AS", "NOUN", "FUNC", "TO", "NOUN"]
    assert t.structural == ["CAP", "FW", "FW", "CW", "FW", "CW", "FW", "FW", "CW"]
    assert t.trigrams()[0] == "^→NOUN→FUNC" and t.trigrams()[4] == "NOUN→AS→NOUN" and t.trigrams()[-1] == "TO→NOUN→$"


def test_subword_pieces_take_the_type_of_their_word(clf):
    t = clf.classify_pieces(["The", "Ġgr", "ass", "Ġis", "Ġ3", ".", "14", "Ġor", "Ġ-", "2"])
    assert t.words == ["The", "grass", "grass", "is", "3.14", "3.14", "3.14", "or", "-2", "-2"]
    assert t.semantic == ["FUNC", "NOUN", "NOUN", "FUNC", "NUM", "NUM", "NUM", "COORD", "NUM", "NUM"]


def test_binary_minus_is_an_operator_not_a_sign(clf):
    t = clf.classify_pieces(["5", "Ġ-", "Ġ2", "Ġ=", "Ġ3"])
    assert t.semantic == ["NUM", "OP", "NUM", "OP", "NUM"]
    t = clf.classify_pieces(["x", "Ġ=", "Ġ-", "2"])
    assert t.semantic[2:] == ["NUM", "NUM"]


def test_code_and_prose_context(clf):
    prose = clf.classify_pieces(["if", "Ġit", "Ġrains", ",", "Ġstay", "Ġin"])
    code = clf.classify_pieces(["if", "Ġx", "Ġ>", "Ġ0", ":", "Ċ", "ĠĠĠ", "Ġreturn", "Ġx"])
    assert prose.semantic[0] == "COND" and not any(prose.code)
    assert code.semantic[0] == "KW" and code.semantic[1] == "VAR" and code.semantic[7] == "KW" and all(
        c for c, s in zip(code.code, code.semantic) if s != "WS")
    assert is_code_line("def hello():") and is_code_line("x = foo(y);") and not is_code_line("If it rains, we stay.")
    assert not is_code_line("King is to queen as man is to woman.")


def test_real_bpe_tokenizer_offsets_and_ids_agree(clf):
    tok = tiny_bpe_tokenizer()
    text = "The elephant is bigger than the mouse. def hello(x):"
    by_text = clf.classify_text(text, tok)
    ids = tok(text)["input_ids"]
    by_ids = PieceDecoder(tok).classify_ids(clf, ids)
    assert by_text.semantic == by_ids.semantic and by_text.structural == by_ids.structural
    assert by_text.semantic[0] == "SP"                                    # BOS
    # every piece of "elephant" (however BPE split it) is a NOUN, and they all name the word
    pieces = [i for i, w in enumerate(by_text.words) if w == "elephant"]
    assert pieces and all(by_text.semantic[i] == "NOUN" for i in pieces)
    assert "".join(by_text.tokens[i] for i in pieces).strip() == "elephant"
    with pytest.raises(ValueError, match="empty"):
        clf.classify_text("   ", tok)


def test_lexicon_file_extends_and_replaces(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my words\n[NOUN]\nzorblax\n[SYN]\nakin\n")
    extended = TokenClassifier(load_lexicon([f]))
    assert extended.classify_token("zorblax") == ("NOUN", "CW")
    assert extended.classify_token("akin") == ("SYN", "CW")
    assert extended.classify_token("queen") == ("NOUN", "CW")             # shipped words kept
    replaced = TokenClassifier(load_lexicon([f], replace=True))
    assert replaced.classify_token("queen") == ("CW", "CW")               # shipped words gone
    assert TokenClassifier().classify_token("zorblax") == ("CW", "CW")
    bad = tmp_path / "bad.txt"
    bad.write_text("[WHAT]\nx\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: unknown lexicon type \[WHAT\]"):
        load_lexicon([bad])
    with pytest.raises(FileNotFoundError, match="--lexicon file"):
        load_lexicon([tmp_path / "missing.txt"])


def test_pos_tagger_hook_is_consulted_for_prose_words():
    seen = []

    def tagger(words):
        seen.extend(words)
        return ["VERB" if w == "zorblax" else None for w in words]

    t = TokenClassifier(pos_tagger=tagger).classify_pieces(["they", "Ġzorblax", "Ġthe", "Ġqueen"])
    assert t.semantic == ["FUNC", "VERB", "FUNC", "NOUN"] and seen == ["they", "zorblax", "the", "queen"]


def test_comments_and_strings_in_code_are_prose(clf):
    t = clf.classify_pieces(["def", "Ġf", "():", "Ċ", "ĠĠĠ", "Ġ#", "Ġif", "Ġnot", "Ċ", "ĠĠĠ", "Ġreturn", "Ġ\"", "as",
                             "Ġhappy", "\"", "Ġif", "Ġx"])
    by_word = {(w, i): s for i, (w, s) in enumerate(zip(t.words, t.semantic))}
    assert by_word[("if", 6)] == "COND" and by_word[("not", 7)] == "NEG"          # in the comment
    assert by_word[("as", 12)] == "AS" and by_word[("happy", 13)] == "ADJ"        # in the string
    assert by_word[("if", 15)] == "KW" and by_word[("x", 16)] == "VAR"            # code again
