"""Capture hooks against an independent recomputation of every family's router, and batched capture vs unbatched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lazarus_core.routing.capture import capture_routing
from lazarus_core.routing.corpus import EmptyInputError, corpus_from_prompts
from lazarus_core.routing.locate import NoMoeLayersError, find_moe_layers
from lazarus_core.routing.recorder import RoutingRecorder
from lazarus_core.routing.trace_reader import load_trace
from tests.routing.reference import assert_capture_matches_recomputation
from tests.routing.tiny_models import FAMILIES, tiny_model, tiny_tokenizer

TEXTS = ["the water was very long and the man said no", "it is what it is",
         "one two three", "people made this for their own time and then some more words came back"]


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_independent_router_recomputation(family):
    assert_capture_matches_recomputation(tiny_model(family), torch.randint(3, 96, (2, 5)))


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss", "dbrx"])
def test_batched_padded_capture_equals_one_sequence_at_a_time(family, tmp_path):
    model, tok = tiny_model(family), tiny_tokenizer()
    info = find_moe_layers(model)
    result = capture_routing(model, tok, corpus_from_prompts(TEXTS), tmp_path / "t", seq_len=8, batch_size=3,
                             logits=True, progress=False)
    trace = load_trace(tmp_path / "t")
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert trace.num_tokens == result.num_tokens == sum(lengths)        # padding never stored
    assert trace.meta["num_documents"] == len(TEXTS) and trace.layers == sorted(info.layers)
    for doc, text in enumerate(TEXTS):
        span = trace.document(doc)
        ids = tok(text)["input_ids"]
        assert span.token_ids.tolist() == ids and (span.doc_ids == doc).all()
        expected_pos = [i % 8 for i in range(len(ids))]                  # restarts in each window of 8
        assert span.positions.tolist() == expected_pos
        for start in range(0, len(ids), 8):                               # each window alone, no padding
            with RoutingRecorder(model, logits=True) as rec, torch.no_grad():
                model.base_model(input_ids=torch.tensor([ids[start:start + 8]]))
                alone = rec.pop()
            for l in trace.layers:
                got = span.layer(l)
                sl = slice(start, start + 8)
                assert np.array_equal(got.topk_ids[sl], alone[l].topk_ids.numpy())
                np.testing.assert_allclose(got.topk_weights[sl], alone[l].topk_weights.numpy(), rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(got.logits[sl], alone[l].logits.numpy(), rtol=1e-2, atol=1e-2)


def test_layers_subset_and_max_tokens(tmp_path):
    model = tiny_model("deepseek_v2")
    capture_routing(model, tiny_tokenizer(), corpus_from_prompts(TEXTS), tmp_path / "t", layers=[1],
                    max_tokens=13, seq_len=16, progress=False)
    trace = load_trace(tmp_path / "t")
    assert trace.layers == [1] and trace.num_tokens == 13 and trace.meta["all_moe_layers"] == [1]
    assert trace.layer(1).topk_ids.shape == (13, 2) and trace.layer(1).logits is None
    with pytest.raises(ValueError, match=r"layer 0 is not in this trace; its layers are \[1\]"):
        trace.layer(0)


def test_unknown_layer_is_a_clear_error(tmp_path):
    model = tiny_model("deepseek_v3")
    with pytest.raises(ValueError, match=r"layer\(s\) \[0\] are not MoE layers .* MoE layers are \[1\]"):
        capture_routing(model, tiny_tokenizer(), corpus_from_prompts(TEXTS), tmp_path / "t", layers=[0], progress=False)
    with pytest.raises(ValueError, match=r"\[5\] are not MoE layers"):
        RoutingRecorder(model, [5])


def test_empty_input_is_a_clear_error(tmp_path):
    with pytest.raises(EmptyInputError, match="prompt 1"):
        corpus_from_prompts(["fine", "  "])
    with pytest.raises(EmptyInputError, match="no prompt"):
        corpus_from_prompts([])


def test_model_without_moe_layers_is_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    with pytest.raises(NoMoeLayersError, match="llama model has no MoE layers"):
        find_moe_layers(dense)
    with pytest.raises(NoMoeLayersError):
        RoutingRecorder(dense)
