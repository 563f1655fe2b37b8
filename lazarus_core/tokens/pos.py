"""The optional part-of-speech hook: use NLTK's tagger when it and its data are installed (never downloads)."""

from __future__ import annotations

from typing import Sequence

_UPOS = {"NN": "NOUN", "VB": "VERB", "JJ": "ADJ"}


def nltk_pos_tagger():
    """A :data:`lazarus_core.tokens.classifier.PosTagger` backed by ``nltk.pos_tag``.

    Returns
    -------
    callable
        ``words -> [NOUN|VERB|ADJ|None]`` (Penn tags NN*, VB*, JJ*; anything else None).

    Raises
    ------
    ValueError
        NLTK or its tagger data is not installed (``--pos-tagger nltk`` names what to install; nothing
        is downloaded).
    """
    try:
        import nltk

        nltk.pos_tag(["test"])
    except ImportError:
        raise ValueError("--pos-tagger nltk: nltk is not installed (pip install nltk)") from None
    except LookupError:
        raise ValueError("--pos-tagger nltk: the NLTK tagger data is not installed "
                         "(python -m nltk.downloader averaged_perceptron_tagger_eng)") from None

    def tag(words: Sequence[str]) -> list[str | None]:
        return [_UPOS.get(t[:2]) for _, t in nltk.pos_tag(list(words))] if words else []

    return tag
