"""expert-merging: planted identical experts are the top candidate and merge for ~free; random pairs cost more."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lazarus_core.analysis.expert_merging import (
    MergedExperts,
    expert_merging,
    merge_counts,
    output_similarity,
    router_probabilities,
    routing_similarity,
    weight_similarity,
)
from lazarus_core.analysis.expert_similarity import linear_cka
from lazarus_core.routing import find_moe_layers
from tests.routing.tiny_models import tiny_model, tiny_tokenizer

TEXTS = ["the a of and to in is it that was he for on are as with his they at be this",
         "from have or by one had not but what all were when we there can an your which",
         "their said if do will each about how up out them then she many some so these would",
         "other into has more her two like him see time could no make than first been its who",
         "now people my made over did down only way find use may water long little very after",
         "words called just where most know get through back much before go good new write our"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def planted_model(layer: int = 1, a: int = 4, b: int = 5, family: str = "olmoe"):
    """A tiny model whose experts a and b of ``layer`` are identical (weights and router rows)."""
    model = tiny_model(family, seed=2)
    info = find_moe_layers(model)
    L = info.layers[layer]
    with torch.no_grad():
        for p in L.experts.parameters():
            p[b] = p[a]
        L.router.weight[b] = L.router.weight[a]
    return model, info


def _trace(model, tmp_path):
    from lazarus_core.routing import capture_routing, load_trace

    capture_routing(model, tiny_tokenizer(), TEXTS, tmp_path / "t", seq_len=64, logits=True, hidden_states=True,
                    progress=False)
    return load_trace(tmp_path / "t")


def _docs(trace):
    return [np.asarray(trace.token_ids)[np.asarray(trace.doc_ids) == d].tolist() for d in trace.document_ids()]


def test_cka_and_cosine_of_identical_experts_is_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16))
    assert linear_cka(x, x) == pytest.approx(1.0)
    outs = rng.normal(size=(64, 4, 16))
    outs[:, 3] = outs[:, 1]
    cka = output_similarity(outs)
    assert cka[1, 3] == pytest.approx(1.0) and abs(cka[0, 2]) < 0.3
    model, info = planted_model()
    w, d = weight_similarity(info.layers[1].experts, 8)
    assert w[4, 5] == pytest.approx(1.0) and d[4, 5] == pytest.approx(1.0)
    probs = router_probabilities(rng.normal(size=(100, 6)))
    probs[:, 2] = probs[:, 5]
    assert routing_similarity(probs)[2, 5] == pytest.approx(1.0)


def test_merged_router_gives_the_pair_its_probability_mass_and_restores():
    model, info = planted_model()
    L = info.layers[1]
    h = torch.randn(20, 32)
    before = [p.detach().clone() for p in L.experts.parameters()]
    logits, _, _ = L.router(h)
    p = torch.softmax(logits.float(), -1)
    with MergedExperts(model, [(1, 0, 2)], {(1, 0): 3.0, (1, 2): 1.0}, info=info):
        _, w, ids = L.router(h)
        merged = L.experts.down_proj[0].clone()
        assert not (ids == 2).any()                      # the removed expert is never chosen
        where = ids == 0
        rows = where.any(1)
        # OLMoE keeps the softmax probabilities: the merged expert carries p0 + p2
        torch.testing.assert_close(w[where], (p[:, 0] + p[:, 2])[rows])
    torch.testing.assert_close(merged, 0.75 * before[1][0] + 0.25 * before[1][2])
    for p0, p1 in zip(before, L.experts.parameters()):
        assert torch.equal(p0, p1)                       # the model is restored


def test_planted_pair_is_top_candidate_and_merges_for_free(tmp_path):
    model, info = planted_model()
    trace = _trace(model, tmp_path)
    docs = _docs(trace)
    res = expert_merging(model, trace, docs, threshold=0.8, measure="weights", max_merges=2, random_repeats=3,
                         n_boot=300, null_draws=16)
    top = res.candidates[0]
    assert (top.layer, top.experts) == (1, [4, 5]) and top.above_threshold
    assert top.similarity["weights"] == pytest.approx(1.0)
    assert top.similarity["routing"] == pytest.approx(1.0, abs=1e-3)
    assert top.similarity["outputs"] == pytest.approx(1.0, abs=1e-6)
    assert sum(c.above_threshold for c in res.candidates) == 1       # random tiny experts are not similar
    one = res.pareto[0]
    assert one.merges == 1 and one.pairs == [[1, 4, 5]]
    assert one.bytes_saved == res.bytes_per_expert[1]
    # the identical pair costs (almost) nothing; random pairs cost clearly more
    assert abs(one.delta_nll.estimate) < 0.2 * one.random_delta_nll.estimate
    assert one.random_kl.estimate > 5 * one.kl.estimate


def test_nothing_there_random_experts_have_no_candidates(tmp_path):
    model = tiny_model("qwen3_moe", seed=4)
    trace = _trace(model, tmp_path)
    res = expert_merging(model, trace, None, threshold=0.8, null_draws=16)
    assert res.mergeable_share == 0.0 and not res.pareto
    for rows in res.distributions.values():
        by = {d.measure: d for d in rows}
        assert by["weights"].above_threshold == 0
        assert abs(by["weights"].mean) < 5 * by["weights"].null_q95 + 0.05
        assert by["deltas"].independent_mean == pytest.approx(-1 / 7)
        assert by["weights"].null_above_threshold == 0.0


def test_gpt_oss_biases_are_merged_too():
    model, info = planted_model(layer=1, a=0, b=1, family="gpt_oss")
    L = info.layers[1]
    old = L.experts.down_proj_bias.detach().clone()
    with MergedExperts(model, [(1, 2, 3)], info=info):
        torch.testing.assert_close(L.experts.down_proj_bias[2], 0.5 * (old[2] + old[3]))
    torch.testing.assert_close(L.experts.down_proj_bias, old)


def test_errors_and_counts():
    assert merge_counts(5) == [1, 2, 4, 5] and merge_counts(4) == [1, 2, 4] and merge_counts(0) == []
    model, info = planted_model()
    with pytest.raises(ValueError, match="disjoint"):
        MergedExperts(model, [(1, 0, 1), (1, 1, 2)], info=info)
    with pytest.raises(ValueError, match="MoE layer"):
        MergedExperts(model, [(7, 0, 1)], info=info)
