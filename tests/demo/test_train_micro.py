"""The training script still works end to end: a micro run of each model kind (a few steps)."""

from __future__ import annotations

import json

import pytest

from lazarus_core.demo.train import MICRO, run


@pytest.mark.slow
@pytest.mark.parametrize("kind,family", [("native", "olmoe"), ("upcycled", "gpt_oss")])
def test_micro_training_writes_a_loadable_model(kind, family, tmp_path):
    from transformers import AutoTokenizer

    from lazarus_core.demo.load import load_causal_lm

    meta = run(kind, tmp_path, MICRO, seed=0, log=lambda *_: None)
    assert meta["family"] == family and meta["steps"] == MICRO.steps
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lazarus_builtin.json", "heldout.jsonl"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "lazarus_builtin.json").read_text())["alias"] == f"demo:{kind}"
    model = load_causal_lm(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok("2 + 2 = 4", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == len(tok)


def test_corpus_is_seeded_and_covers_every_category():
    from lazarus_core.demo.corpus import CATEGORIES, build_corpus

    a = build_corpus(3, templated_docs=400, code_chars=5000)
    b = build_corpus(3, templated_docs=400, code_chars=5000)
    assert a.train == b.train and a.heldout == b.heldout and a.heldout
    assert set(a.train_categories) == set(CATEGORIES)
    arithmetic = [d for d, c in zip(a.train, a.train_categories) if c == "arithmetic"]
    # every "x + y = z" with integers is correct
    import re

    for doc in arithmetic:
        for x, y, z in re.findall(r"\b(\d+) \+ (\d+) = (\d+)\b(?!\.\d)", doc):
            assert int(x) + int(y) == int(z)
