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
