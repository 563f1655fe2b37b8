"""Attention next to routing: rank correlation, planted attention/expert groups, and the eager forward's arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lazarus_core.analysis.attention_routing import (attention_and_routing, attention_routing_stats, head_entropy_bits,
                                                     spearman)
from lazarus_core.routing.locate import find_moe_layers
from lazarus_core.routing.recorder import RoutingRecorder
from tests.routing.tiny_models import tiny_model


def test_spearman_known_values():
    assert spearman(np.arange(5), np.arange(5) ** 3) == pytest.approx(1.0)
    assert spearman(np.arange(5), -np.arange(5)) == pytest.approx(-1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)   # 1 - 6*2/(4*15)
    # ties get average ranks: [1, 2, 2, 3] -> ranks [0, 1.5, 1.5, 3]
    assert spearman(np.array([1, 2, 2, 3]), np.array([0, 1.5, 1.5, 3])) == pytest.approx(1.0)
    assert np.isnan(spearman(np.array([1, 2]), np.array([2, 1])))
    assert np.isnan(spearman(np.ones(5), np.arange(5)))


def test_head_entropy_bits():
    assert head_entropy_bits(np.full(4, 0.25)) == pytest.approx(2.0)
    assert head_entropy_bits(np.array([1.0, 0, 0])) == 0.0


def _groups(n, rng):
    group = rng.integers(0, 2, n)
    attn = np.zeros((n, n))
    attn[np.arange(n), group] = 1.0                 # group g attends to position g only
    return attn, group


def test_planted_groups_share_experts():
    rng = np.random.default_rng(0)
    rows, sets = [], []
    for _ in range(3):
        attn, group = _groups(12, rng)
        rows.append(attn)
        sets.append(np.where(group[:, None] == 0, [0, 1], [2, 3]))
    res = attention_routing_stats(rows, sets, layer=4)
    assert res.layer == 4 and res.pairs == 3 * 12 * 11 // 2
    assert res.same_expert_when_similar == pytest.approx(1.0)
    assert res.same_expert_when_dissimilar == pytest.approx(0.0)
    assert res.spearman > 0.9


def test_experts_unrelated_to_attention_show_no_link():
    rng = np.random.default_rng(1)
    rows, sets = [], []
    for _ in range(20):
        attn, _ = _groups(16, rng)
        rows.append(attn)
        sets.append(np.array([rng.choice(8, 2, replace=False) for _ in range(16)]))
    res = attention_routing_stats(rows, sets, layer=0)
    assert abs(res.spearman) < 0.1
    assert abs(res.same_expert_when_similar - res.same_expert_when_dissimilar) < 0.05


def test_single_positions_give_nan():
    res = attention_routing_stats([np.ones((1, 1))], [np.array([[0, 1]])], layer=0)
    assert res.pairs == 0 and np.isnan(res.spearman)


@pytest.mark.parametrize("family", ["olmoe", "dbrx"])  # DBRX: blocks[L].norm_attn_norm.attn
def test_attention_and_routing_on_a_tiny_model(family):
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    info = find_moe_layers(model)
    ids = [1, 5, 9, 12, 30, 7]
    layers = sorted(info.layers)
    attn, routed = attention_and_routing(model, ids, layers, info=info)
    with RoutingRecorder(model, layers, info=info) as rec, torch.no_grad():
        model(torch.tensor([ids]))
        ref = rec.pop()
    for l in layers:
        a = attn[l]
        heads = getattr(model.config, "num_attention_heads", None) or model.config.n_heads
        assert a.shape == (heads, len(ids), len(ids))
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(a, 1) == 0)                       # causal
        np.testing.assert_array_equal(routed[l][0], ref[l].topk_ids.numpy())


def test_attention_features_refuse_dbrx_naming_its_layernorm():
    from lazarus_core.analysis.attention_features import attention_features

    model = tiny_model("dbrx")
    with pytest.raises(ValueError, match="LayerNorm of r \\+ a"):
        attention_features(model, [[1, 5, 9]], sorted(find_moe_layers(model).layers))
