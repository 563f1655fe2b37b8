"""Mantel test of attention vs routing similarity: planted correlated matrices give a small p, independent ones do not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lazarus_core.analysis.context_attention_routing import (context_attention_routing, cosine_matrix,
                                                             correlation_matrix, jaccard_matrix, mantel_test,
                                                             offset_profiles, router_probabilities)


def _planted(rng, n=14, d=10, e=8, k=2, coupled=True):
    """Attention vectors and expert sets of n contexts; coupled: the experts are a function of the attention."""
    att = rng.standard_normal((n, d))
    w = rng.standard_normal((e, d))
    source = att + 0.3 * rng.standard_normal((n, d)) if coupled else rng.standard_normal((n, d))
    logits = source @ w.T
    return att, np.argsort(-logits, 1)[:, :k], logits


def test_similarity_matrices_by_hand():
    sets = np.array([[0, 1], [1, 2], [3, 4]])
    j = jaccard_matrix(sets)
    assert j[0, 1] == pytest.approx(1 / 3) and j[0, 2] == 0 and np.allclose(np.diag(j), 1)
    c = cosine_matrix(np.array([[1.0, 0], [0, 2.0], [1, 1]]))
    assert c[0, 1] == pytest.approx(0) and c[0, 2] == pytest.approx(1 / math.sqrt(2))
    r = correlation_matrix(np.array([[1.0, 2, 3], [2, 4, 6], [3, 2, 1]]))
    assert r[0, 1] == pytest.approx(1) and r[0, 2] == pytest.approx(-1)
    prof = offset_profiles([np.array([0.2, 0.8]), np.array([0.1, 0.2, 0.7])])
    assert prof.tolist() == [[0.8, 0.2, 0.0], [0.7, 0.2, 0.1]]
    p = router_probabilities(np.array([[0.0, 1.0]]), "softmax")
    assert p.sum() == pytest.approx(1) and router_probabilities(np.zeros((1, 2)), "sigmoid")[0, 0] == 0.5


def test_coupled_matrices_give_a_small_permutation_p():
    rng = np.random.default_rng(0)
    att, sets, _ = _planted(rng)
    m = mantel_test(cosine_matrix(att), jaccard_matrix(sets), permutations=999, seed=1)
    assert m.statistic > 0.3 and m.p_value < 0.01
    assert m.null_low < m.null_mean < m.null_high < m.statistic
    assert m.interval.low <= m.statistic <= m.interval.high and not m.exact and m.permutations == 999


def test_independent_matrices_do_not():
    rng = np.random.default_rng(1)
    ps = []
    for seed in range(40):
        att, sets, _ = _planted(rng, coupled=False)
        ps.append(mantel_test(cosine_matrix(att), jaccard_matrix(sets), permutations=199, n_boot=0,
                              seed=seed).p_value)
    ps = np.array(ps)
    assert (ps < 0.05).mean() <= 0.15
    assert 0.3 < ps.mean() < 0.7                     # p is about uniform under the null


def test_exact_permutations_for_few_contexts():
    rng = np.random.default_rng(2)
    a = cosine_matrix(rng.standard_normal((5, 4)))
    m = mantel_test(a, a, permutations=999)
    assert m.exact and m.permutations == math.factorial(5)
    assert m.statistic == pytest.approx(1.0) and m.p_value >= 1 / 120
    two = mantel_test(a, -a, permutations=999, alternative="two-sided")
    assert two.statistic == pytest.approx(-1.0) and two.p_value < 0.1
    assert np.isnan(mantel_test(a[:2, :2], a[:2, :2]).statistic)


def test_context_attention_routing_per_layer_with_bh():
    rng = np.random.default_rng(3)
    att1, sets1, logits1 = _planted(rng, coupled=True)
    att2, sets2, logits2 = _planted(rng, coupled=False)
    ctx = [f"c{i}" for i in range(len(att1))]
    res = context_attention_routing("x", ctx, {1: att1, 2: att2}, {1: sets1, 2: sets2},
                                    probabilities={1: router_probabilities(logits1, "softmax"),
                                                   2: router_probabilities(logits2, "softmax")},
                                    routing_similarity="probability", seed=0)
    one, two = res.layers
    assert one.layer == 1 and one.mantel.p_value < 0.01 and one.q_value >= one.mantel.p_value
    assert two.mantel.p_value > one.mantel.p_value
    d = res.to_dict()
    assert d["layers"][0]["mantel"]["statistic"] == one.mantel.statistic and len(d["layers"][0]["routing_similarity"]) == 14
    assert {t for t in res.tables()} == {"layers", "pairs"} and len(res.tables()["pairs"]) == 2 * 91
    with pytest.raises(ValueError, match="at least 3 contexts"):
        context_attention_routing("x", ["a", "b"], {1: att1[:2]}, {1: sets1[:2]})
    with pytest.raises(ValueError, match="--routing-similarity"):
        context_attention_routing("x", ctx, {1: att1}, {1: sets1}, routing_similarity="kl")
