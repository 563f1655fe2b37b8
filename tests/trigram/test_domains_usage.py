"""Domain chi-square / Cramer's V, expert enrichment, co-activation and weight statistics against hand answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lazarus_core.trigram.domains import chi_square, domain_test
from lazarus_core.trigram.enrichment import expert_enrichment
from lazarus_core.trigram.usage import coactivation_matrix, layer_usage, layer_weights


def test_chi_square_2x2_by_hand():
    # [[10, 20], [30, 40]]: expected [[12, 18], [28, 42]]
    chi2, dof, p, v = chi_square(np.array([[10, 20], [30, 40]]))
    hand = 4 / 12 + 4 / 18 + 4 / 28 + 4 / 42
    assert chi2 == pytest.approx(hand) and dof == 1 and v == pytest.approx(np.sqrt(hand / 100))
    assert chi_square(np.array([[5, 0], [0, 5]]))[3] == pytest.approx(1.0)
    assert chi_square(np.array([[5, 5], [5, 5], [0, 0]]))[:2] == (0.0, 1)    # empty row dropped


def _docs(specialist: bool, seed=0):
    rng = np.random.default_rng(seed)
    ids, docs, labels = [], [], {}
    for d in range(20):
        domain = "math" if d % 2 else "code"
        labels[d] = domain
        for _ in range(30):
            first = (0 if domain == "math" else 1) if specialist else int(rng.integers(0, 4))
            ids.append([first, 2 if first != 2 else 3])
            docs.append(d)
    return np.array(ids), np.array(docs), labels


def test_domain_test_separates_specialists_from_generalists():
    ids, docs, labels = _docs(True)
    res = domain_test(ids, docs, labels, 4, layer=0, permutations=200)
    assert res.cramers_v == pytest.approx(1.0) and res.p_value < 1e-10 and res.permutation_p_value == pytest.approx(1 / 201)
    assert res.experts[0].top_domain_share == 1.0 and res.domains == ["code", "math"]
    ids, docs, labels = _docs(False)
    res = domain_test(ids, docs, labels, 4, layer=0, permutations=200)
    assert res.cramers_v < 0.2 and res.permutation_p_value > 0.01
    with pytest.raises(ValueError, match="at least two domains"):
        domain_test(ids, docs, {d: "one" for d in labels}, 4, layer=0)


def test_enrichment_by_hand():
    ids = np.array([[0, 1], [0, 2], [1, 2], [1, 3]])
    mask = np.array([True, True, False, False])
    out = {e.expert: e for e in expert_enrichment(ids, mask, 4)}
    assert out[0].count == 2 and out[0].share == 1.0 and out[0].layer_share == 0.5 and out[0].lift == 2.0
    assert out[0].p_value == pytest.approx(0.25)                           # P[Bin(2, .5) >= 2]
    assert 3 not in out and list(out)[0] == 0


def test_coactivation_and_usage_match_a_loop():
    rng = np.random.default_rng(3)
    ids = np.stack([rng.permutation(6)[:3] for _ in range(500)])
    co = coactivation_matrix(ids, 6, chunk=64)
    loop = np.zeros((6, 6), dtype=np.int64)
    for row in ids:
        for a, b in itertools.product(row, row):
            loop[a, b] += 1
    assert np.array_equal(co, loop)
    use = layer_usage(ids, 6, layer=1, min_count=1, top_pairs=15)
    assert sum(use.load) == pytest.approx(3.0) and sum(use.primary_load) == pytest.approx(1.0)
    assert use.max_entropy_bits == pytest.approx(np.log2(6)) and use.load_entropy_bits <= use.max_entropy_bits
    pair = use.top_pairs[0]
    assert pair.count == loop[pair.a, pair.b]


def test_weight_statistics_by_hand():
    ids = np.array([[0, 1], [1, 0]])
    w = np.array([[0.6, 0.3], [0.5, 0.4]], dtype=np.float32)
    s = layer_weights(ids, w, 3, layer=0)
    assert s.rank_mean == pytest.approx([0.55, 0.35]) and s.row_sum_mean == pytest.approx(0.9)
    assert s.primary_margin_mean == pytest.approx(0.2)
    assert s.expert_mean_weight[0] == pytest.approx(0.5) and s.expert_mean_weight[1] == pytest.approx(0.4)
    assert np.isnan(s.expert_mean_weight[2])


def test_bias_corrected_cramers_v_by_hand_and_on_random_labels():
    from lazarus_core.trigram.domains import cramers_v_corrected

    # [[10, 20], [30, 40]]: chi2 = 0.7937, n = 100; phi2~ = 0.007937 - 1/99 < 0 -> 0
    assert cramers_v_corrected(100 / 126, 100, 2, 2) == 0.0
    # chi2 = 30, n = 100, 3 x 4: phi2~ = 0.3 - 6/99, r~ = 3 - 4/99, c~ = 4 - 9/99
    expect = np.sqrt((0.3 - 6 / 99) / min(3 - 4 / 99 - 1, 4 - 9 / 99 - 1))
    assert cramers_v_corrected(30.0, 100, 3, 4) == pytest.approx(expect)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8, (400, 1))                     # experts independent of the domain
    docs = np.repeat(np.arange(40), 10)
    res = domain_test(ids, docs, {d: "abcd"[d % 4] for d in range(40)}, 8, layer=0, permutations=0)
    assert res.cramers_v > 0.08 and res.cramers_v_corrected < res.cramers_v / 2 and res.strength == "weak"


def test_permutation_p_at_its_floor_is_flagged():
    docs = np.repeat(np.arange(20), 20)
    ids = (docs % 2)[:, None]                              # expert = domain
    res = domain_test(ids, docs, {d: "ab"[d % 2] for d in range(20)}, 2, layer=0, permutations=30)
    assert res.permutation_p_value == pytest.approx(1 / 31) and res.permutation_p_at_floor
    assert res.strength == "strong"


def test_uniformly_random_routing_gives_coactivation_lift_about_one():
    from lazarus_core.trigram.stats import topk_pair_null

    rng = np.random.default_rng(5)
    ids = np.argsort(rng.random((40000, 8)), axis=1)[:, :2]   # k = 2 distinct of 8, uniformly
    use = layer_usage(ids, 8, layer=0, min_count=1, top_pairs=28)
    lifts = np.array([p.lift for p in use.top_pairs])
    assert len(lifts) == 28 and np.all(np.abs(lifts - 1) < 0.1)     # the p_a * p_b null gave 0.57
    assert topk_pair_null(np.full(8, 0.25), 2)[0, 1] == pytest.approx(2 / 56)


def test_topk_pair_null_is_exact_for_conditional_poisson_sampling():
    from lazarus_core.trigram.stats import topk_pair_null

    rng = np.random.default_rng(6)
    w = rng.random(7) * 4 + 0.2
    subsets = list(itertools.combinations(range(7), 3))
    prob = np.array([np.prod(w[list(s)]) for s in subsets])
    prob /= prob.sum()
    pair = np.zeros((7, 7))
    for s, p in zip(subsets, prob):
        for a, b in itertools.product(s, s):
            pair[a, b] += p
    np.testing.assert_allclose(topk_pair_null(np.diag(pair).copy(), 3), pair, atol=1e-9)
    # skewed loads: rows sum to (k - 1) * inclusion; an always-chosen expert pairs with everyone's load
    load = np.array([1.0, 0.5, 0.5, 0.4, 0.3, 0.3, 0.0])
    null = topk_pair_null(load, 3)
    np.testing.assert_allclose(null.sum(1) - np.diag(null), 2 * load, atol=1e-8)
    np.testing.assert_allclose(null[0, 1:], load[1:], atol=1e-12)
    assert np.all(null[6] == 0)
    with pytest.raises(ValueError, match="sum to k"):
        topk_pair_null(load, 2)
