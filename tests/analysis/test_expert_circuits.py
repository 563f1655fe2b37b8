"""expert_circuits on planted traces: a planted two-layer circuit is found, permuting rows removes it, random routing has none."""

from __future__ import annotations

import numpy as np
import pytest

from lazarus_core.analysis.expert_circuits import (chain_tables, expert_circuits, pair_counts, permute_rows,
                                                   poisson_sf, triple_counts)
from tests.analysis.test_cold_experts import make_trace, random_routing

E, K, N = 8, 2, 6000


def _naive_counts(a, b, c=None):
    out = np.zeros((E,) * (2 if c is None else 3), dtype=np.int64)
    for t in range(len(a)):
        for i in a[t]:
            for j in b[t]:
                if c is None:
                    out[i, j] += 1
                else:
                    for l in c[t]:
                        out[i, j, l] += 1
    return out


def test_counts_match_a_loop_and_expectation_is_exact_under_independence():
    rng = np.random.default_rng(0)
    a, b, c = (random_routing(300, E, K, rng) for _ in range(3))
    assert np.array_equal(pair_counts(a, b, E), _naive_counts(a, b))
    assert np.array_equal(triple_counts(a, b, c, E), _naive_counts(a, b, c))
    tables = chain_tables([a, b], [0, 1], E, 2)
    assert tables[0].expected.sum() == pytest.approx(300 * K * K)          # every token contributes k x k chains
    # the null's mean is exact: averaged over many row permutations the count converges to `expected`
    perm_mean = np.mean([pair_counts(*permute_rows([a, b], s), E) for s in range(300)], axis=0)
    assert np.abs(perm_mean - tables[0].expected).max() < 1.0
    assert poisson_sf(np.array([0, 1]), np.array([2.0, 0.0])).tolist() == [1.0, 0.0]
    assert poisson_sf(np.array([3]), np.array([3.0]))[0] == pytest.approx(1 - np.exp(-3) * (1 + 3 + 4.5))


def _planted(seed=0):
    """Layers 0, 1, 2 random; on 20% of the tokens of odd documents (50 tokens each) expert 2 at layer 0 is
    followed by expert 5 at layer 1."""
    rng = np.random.default_rng(seed)
    ids = {l: random_routing(N, E, K, rng) for l in range(3)}
    planted = (rng.random(N) < 0.20) & ((np.arange(N) // 50) % 2 == 1)
    ids[0][planted, 0] = 2
    ids[0][planted, 1] = np.where(ids[0][planted, 1] == 2, 3, ids[0][planted, 1])
    ids[1][planted, 0] = 5
    ids[1][planted, 1] = np.where(ids[1][planted, 1] == 5, 6, ids[1][planted, 1])
    tokens = np.where(planted, 9, rng.integers(20, 40, N))
    return make_trace(ids, E, tokens), planted


def test_planted_circuit_is_found_and_the_permuted_trace_gives_none():
    trace, planted = _planted()
    res = expert_circuits(trace, length=2, seed=0)
    top = res.circuits[0]
    assert top.path == [[0, 2], [1, 5]]
    hit = (trace.layer(0).topk_ids == 2).any(1) & (trace.layer(1).topk_ids == 5).any(1)
    assert top.count == int(hit.sum()) and top.lift > 1.3 and top.q_value < 1e-10
    pi0, pi1 = (trace.layer(0).topk_ids == 2).any(1).mean(), (trace.layer(1).topk_ids == 5).any(1).mean()
    assert top.expected == pytest.approx(N * pi0 * pi1)
    assert top.consistency == pytest.approx(hit.sum() / (trace.layer(0).topk_ids == 2).any(1).sum())
    assert top.consistency > top.consistency_baseline == pytest.approx(pi1)
    assert res.windows == [[0, 1], [1, 2]] and res.tests == 2 * E * E
    assert res.significant_permuted <= 1 and res.significant >= 1
    d = res.to_dict()
    assert d["circuits"][0]["path"] == [[0, 2], [1, 5]]
    qs = [(c["q_value"], -c["lift"]) for c in d["circuits"]]
    assert qs == sorted(qs)
    # the window that holds no planted structure (layers 1 -> 2) gives (almost) nothing
    assert sum(1 for c in res.circuits if c.path[0][0] == 1) <= 1


def test_length_three_extends_the_planted_pair_with_markov_expectation():
    trace, planted = _planted(1)
    res = expert_circuits(trace, length=3)
    assert res.tests == E ** 3 and res.windows == [[0, 1, 2]]
    # the triples through (0,2)->(1,5) are over-represented against full independence but not against the
    # Markov expectation: layer 2 is independent of layer 0 given layer 1
    through = [c for c in res.circuits if c.path[:2] == [[0, 2], [1, 5]]]
    assert through and all(abs(c.count / c.markov_expected - 1) < 0.6 for c in through)
    assert res.significant_permuted <= 1


def test_random_routing_gives_almost_no_significant_chain():
    rng = np.random.default_rng(2)
    ids = {l: random_routing(N, E, K, rng) for l in range(4)}
    for length in (2, 3):
        res = expert_circuits(make_trace(ids, E), length=length)
        assert res.significant <= 1 and res.significant_permuted <= 1


def test_serves_lists_domains_with_lift():
    trace, planted = _planted()
    labels = {d: ("math" if d % 2 else "prose") for d in range(int(trace.doc_ids.max()) + 1)}
    res = expert_circuits(trace, length=2, doc_labels=labels)
    top = res.circuits[0]
    assert {s.kind for s in top.serves} == {"domain"} and top.serves[0].key == "math" and top.serves[0].lift > 1.3
    assert all(s.lift == pytest.approx(s.share / s.baseline) for s in top.serves)


def test_bad_input():
    trace, _ = _planted()
    with pytest.raises(ValueError, match="--length"):
        expert_circuits(trace, length=4)
    with pytest.raises(ValueError, match="--layers"):
        expert_circuits(trace, layers=[0, 7])
    with pytest.raises(ValueError, match="--length 3"):
        expert_circuits(trace, layers=[0, 1], length=3)
