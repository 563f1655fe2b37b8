"""cold_experts on planted traces and a constructed model: a never-chosen expert is cold and free to ablate; uniform routing has none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lazarus_core.analysis.cold_experts import (activation_shares, cold_experts, default_threshold,
                                                expected_cold_uniform)
from lazarus_core.routing.trace_reader import LayerTrace, TokenSpan, Trace


def random_routing(n: int, e: int, k: int, rng, experts=None) -> np.ndarray:
    """int32 [n, k]: k distinct experts per token drawn uniformly from ``experts`` (default all)."""
    pool = np.arange(e) if experts is None else np.asarray(experts)
    pick = np.argsort(rng.random((n, len(pool))), axis=1)[:, :k]
    return pool[pick].astype(np.int32)


def make_trace(layer_ids: dict[int, np.ndarray], num_experts: int, tokens=None, per_doc: int = 50,
               logits: dict[int, np.ndarray] | None = None) -> Trace:
    n, k = next(iter(layer_ids.values())).shape
    doc_ids = (np.arange(n) // per_doc).astype(np.int32)
    positions = (np.arange(n) % per_doc).astype(np.int32)
    tokens = np.arange(n) % 17 if tokens is None else tokens
    meta = {"moe_layers": sorted(layer_ids), "num_tokens": n, "num_experts": num_experts, "top_k": k,
            "has_logits": logits is not None, "shards": [], "num_documents": int(doc_ids.max()) + 1}
    layers = {l: LayerTrace(l, ids.astype(np.int32), np.full((n, k), 1.0 / k, np.float32),
                            None if logits is None else logits[l].astype(np.float16)) for l, ids in layer_ids.items()}
    return Trace(Path("planted"), meta, [TokenSpan(np.asarray(tokens, np.int32), doc_ids, positions, layers)])


def test_shares_threshold_and_uniform_null():
    ids = np.array([[0, 1], [0, 2], [0, 1], [1, 2]])
    counts, shares = activation_shares(ids, 4)
    assert counts.tolist() == [3, 3, 2, 0] and shares.sum() == pytest.approx(1.0)
    assert shares[0] == pytest.approx(3 / 8)
    assert default_threshold(8) == pytest.approx(1 / 32)
    # far more tokens than experts: uniform routing essentially never leaves an expert below a quarter of uniform
    assert expected_cold_uniform(4000, 8, 2, 1 / 32) < 1e-6
    # at a threshold of twice uniform, every expert is "cold" under uniform routing
    assert expected_cold_uniform(4000, 8, 2, 2 / 8) == pytest.approx(8.0, abs=1e-6)


def test_planted_cold_expert_and_its_triggers():
    rng = np.random.default_rng(0)
    n, E, k = 4000, 8, 2
    ids = random_routing(n, E, k, rng, experts=range(7))          # expert 7 never ...
    tokens = rng.integers(20, 40, n)
    rare = rng.random(n) < 0.02                                    # ... except on token 5, now and then
    tokens[rare] = 5
    ids[rare, 1] = 7
    logits = rng.normal(0, 1, (n, E))
    logits[:, 7] -= 3
    logits[rare, 7] += 6
    res = cold_experts(make_trace({3: ids}, E, tokens, logits={3: logits}))
    layer = res.layers[0]
    assert [c.expert for c in layer.cold_experts] == [7] and res.num_cold == 1
    cold = layer.cold_experts[0]
    assert cold.share == pytest.approx(rare.sum() / (n * k)) and cold.share_ci.low < cold.share < cold.share_ci.high
    assert cold.top_tokens[0].key == "5" and cold.top_tokens[0].lift == pytest.approx(1 / rare.mean())
    assert all(c.selected and c.token.strip() == "5" for c in cold.top_logit_contexts)
    assert layer.expected_cold_uniform < 1e-6 and sum(layer.shares) == pytest.approx(1.0)
    assert cold.ablation is None and res.prune_all is None          # no model: no ablation
    d = res.to_dict()["layers"][0]
    assert d["layer"] == 3 and d["cold_experts"][0]["expert"] == 7 and d["cold_experts"][0]["ablation"] is None


def test_uniform_routing_has_no_cold_expert():
    rng = np.random.default_rng(1)
    res = cold_experts(make_trace({0: random_routing(4000, 8, 2, rng), 1: random_routing(4000, 8, 2, rng)}, 8))
    assert res.num_cold == 0 and all(not l.cold_experts for l in res.layers)
    assert all(l.effective_experts > 7.9 for l in res.layers) and all(l.gini < 0.05 for l in res.layers)


def test_never_chosen_expert_is_cold_and_its_ablation_costs_exactly_nothing(tmp_path):
    """GPT-OSS router: bias -1e4 on expert 3 of the first MoE layer, so it is never chosen, and (softmax over the
    selected k only) removing it changes nothing, bit for bit; a random non-cold expert does cost loss."""
    from lazarus_core.routing import capture_routing, find_moe_layers, load_trace
    from lazarus_core.routing.corpus import corpus_from_prompts
    from tests.routing.tiny_models import tiny_model, tiny_tokenizer

    model, tok = tiny_model("gpt_oss"), tiny_tokenizer()
    info = find_moe_layers(model)
    first = sorted(info.layers)[0]
    with torch.no_grad():
        router = info.layers[first].router
        router.weight[3].zero_()
        router.bias[3] = -1e4
    words = "the a of and to in is it that was he for on are as with his they at be this from have or by one".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 24)) for _ in range(6)]
    capture_routing(model, tok, corpus_from_prompts(texts), tmp_path / "t", seq_len=32, logits=True, progress=False)
    trace = load_trace(tmp_path / "t")
    res = cold_experts(trace, model=model, tokenizer=tok, loss_documents=6, baseline_draws=1, n_boot=200)
    layer = {l.layer: l for l in res.layers}[first]
    cold = {c.expert: c for c in layer.cold_experts}
    assert 3 in cold and cold[3].count == 0 and cold[3].share == 0.0
    a = cold[3].ablation
    assert a.delta_nll.estimate == 0.0 and a.delta_nll.low == 0.0 and a.delta_nll.high == 0.0 and a.prunable
    assert cold[3].top_logit_contexts is not None and not any(c.selected for c in cold[3].top_logit_contexts)
    # the control: as many random non-cold experts, which the model does use, cost loss
    assert len(layer.random_control) == 1 and layer.random_control[0].delta_nll.estimate != 0.0
    assert 3 not in layer.random_control[0].experts[first]
    assert layer.random_single == layer.random_control or len(layer.cold_experts) > 1
    assert res.prune_all is not None and res.nll_base > 0
    d = res.to_dict()
    entry = next(c for l in d["layers"] if l["layer"] == first for c in l["cold_experts"] if c["expert"] == 3)
    assert entry["ablation"]["delta_nll"] == 0.0 and entry["ablation"]["ci_low"] == 0.0 and entry["ablation"]["ci_high"] == 0.0
