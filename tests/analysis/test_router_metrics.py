"""Router metrics on hand-built routings with known answers, and on uniformly random routing (which must sit on its baseline)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from lazarus_core.analysis.router_entropy import DocumentBootstrap, document_index
from lazarus_core.analysis.router_metrics import (
    domain_specialisation,
    layer_metrics,
    olmoe_coactivation,
    router_metrics,
    router_saturation,
    selection_frequency,
    token_overlap,
    vocabulary_specialisation,
)
from tests.analysis.test_router_entropy import write_trace


def random_routing(n: int, e: int, k: int, seed: int) -> np.ndarray:
    """int32 [n, k]: k distinct experts per token, uniformly at random."""
    return np.argsort(np.random.default_rng(seed).random((n, e)), axis=1)[:, :k].astype(np.int32)


def _boot(n: int, docs=None, n_boot=200):
    return DocumentBootstrap(*document_index(np.zeros(n) if docs is None else docs, n), n_boot=n_boot)


# ----------------------------------------------------------------------------------- selection
def test_selection_frequency_sums_to_k_and_finds_a_planted_expert():
    n, e, k = 2000, 8, 2
    ids = random_routing(n, e, k, 0)
    ids[:, 0] = 5                       # expert 5 is every token's primary
    ids[:, 1] = np.where(ids[:, 1] == 5, 6, ids[:, 1])
    docs = np.repeat(np.arange(20), 100)
    s = selection_frequency(ids, e, _boot(n, docs))
    assert s.any_slot.sum() == pytest.approx(k) and s.primary.sum() == pytest.approx(1.0)
    assert s.any_slot[5] == 1.0 and s.primary[5] == 1.0
    assert np.all(s.any_slot_low <= s.any_slot + 1e-12) and np.all(s.any_slot + 1e-12 >= s.any_slot_low)
    assert np.all(s.any_slot_high >= s.any_slot - 1e-12)
    uniform = selection_frequency(random_routing(20000, e, k, 1), e, _boot(20000, np.repeat(np.arange(200), 100)))
    assert np.abs(uniform.any_slot - k / e).max() < 0.02
    assert np.all((uniform.any_slot_low < k / e + 0.01) & (uniform.any_slot_high > k / e - 0.01))


# -------------------------------------------------------------------------- vocabulary specialisation
def test_vocabulary_specialisation_hand_built():
    tokens = np.array([5, 5, 5, 7, 7, 7, 7, 9, 9])
    primary = np.array([1, 1, 2, 3, 3, 3, 3, 0, 1])
    v = vocabulary_specialisation(tokens, primary, 4, min_count=3, n_perm=20)
    assert v.value.estimate == pytest.approx((2 / 3 + 1.0) / 2)      # token 9 (2 occurrences) left out
    assert v.weighted == pytest.approx((2 + 4) / 7)
    assert v.num_token_ids == 2
    none = vocabulary_specialisation(tokens, primary, 4, min_count=10)
    assert none.value is None and none.num_token_ids == 0 and none.to_dict()["vocabulary_specialisation"] is None


def test_vocabulary_specialisation_planted_and_random():
    n, e = 30000, 16
    rng = np.random.default_rng(2)
    tokens = rng.zipf(1.3, n) % 500
    planted = vocabulary_specialisation(tokens, tokens % e, e, min_count=10, n_perm=10)
    assert planted.value.estimate == pytest.approx(1.0)
    assert planted.null_high < 0.6                                  # the permutation destroys it
    random = vocabulary_specialisation(tokens, rng.integers(0, e, n), e, min_count=10, n_perm=10)
    assert abs(random.value.estimate - random.null_mean) < 0.02     # nothing there: on its baseline
    assert random.value.low < random.null_high and random.value.high > random.null_low


# ----------------------------------------------------------------------------------- saturation
def test_saturation_hand_built_and_identical():
    a = np.array([[0, 1], [2, 3]])
    b = np.array([[1, 0], [2, 5]])
    s = router_saturation(a, b, 6, _boot(2))
    assert s.topk.estimate == pytest.approx(0.75) and s.top1.estimate == pytest.approx(0.5)
    same = router_saturation(a, a, 6, _boot(2))
    assert same.topk.estimate == 1.0 and same.top1.estimate == 1.0


def test_saturation_of_independent_routings_sits_on_the_baseline():
    n, e, k = 20000, 16, 4
    docs = np.repeat(np.arange(200), 100)
    s = router_saturation(random_routing(n, e, k, 3), random_routing(n, e, k, 4), e, _boot(n, docs))
    assert s.topk_baseline == pytest.approx(k / e, rel=0.02)
    assert s.topk.low <= s.topk_baseline + 0.005 and s.topk.high >= s.topk_baseline - 0.005
    assert abs(s.top1.estimate - s.top1_baseline) < 0.01


# ---------------------------------------------------------------------------------- co-activation
def _olmoe_reference(ids: np.ndarray, e: int) -> np.ndarray:
    """A literal port of OLMoE's do_correlation_analysis counting (Counter over adjacent pairs)."""
    pairwise, single = Counter(), Counter()
    for row in ids.tolist():
        for i in row:
            single[i] += 1
        for a, b in zip(row[:-1], row[1:]):
            pairwise[(a, b)] += 1
            pairwise[(b, a)] += 1
    out = np.zeros((e, e))
    for (a, b), c in pairwise.items():
        out[a, b] = c / single[a]
    return out


def test_olmoe_coactivation_hand_built():
    ids = np.array([[0, 1, 2], [1, 0, 3]])
    c = olmoe_coactivation(ids, 4)
    assert c.matrix[0, 1] == 1.0 and c.matrix[1, 2] == 0.5 and c.matrix[2, 1] == 1.0
    assert c.matrix[0, 3] == 0.5 and c.matrix[0, 2] == 0.0          # 0 and 2 share a top-k but are not adjacent
    np.testing.assert_allclose(c.matrix, _olmoe_reference(ids, 4))
    assert c.cochosen[0, 2] == 1 and c.baseline[0, 2] == pytest.approx(1 * (2 / 3) / 2)


def test_olmoe_coactivation_matches_the_reference_and_random_order_sits_on_the_baseline():
    n, e, k = 5000, 8, 4
    ids = random_routing(n, e, k, 5)
    c = olmoe_coactivation(ids, e)
    np.testing.assert_allclose(c.matrix, _olmoe_reference(ids, e))
    off = ~np.eye(e, dtype=bool)
    assert np.abs(c.matrix - c.baseline)[off].max() < 0.03          # random order: nothing there
    assert np.abs(c.matrix - c.independent)[off].max() < 0.03       # independent picks: nothing there
    assert c.independent[0, 1] == pytest.approx((k - 1) / (e - 1) * 2 / k, rel=0.05)
    # planted: expert 1 always right after expert 0 -> far above the random-order baseline
    planted = ids.copy()
    planted[:, 0], planted[:, 1] = 0, 1
    planted[:, 2:] = 2 + random_routing(n, e - 2, k - 2, 6)
    p = olmoe_coactivation(planted, e)
    assert p.matrix[0, 1] == 1.0 and p.baseline[0, 1] == pytest.approx(2 / k)
    assert p.independent[0, 1] == pytest.approx(2 / k)             # both always chosen: adjacent 2/k of the time
    assert p.independent[2, 3] < 0.5 * p.matrix[0, 1]
    assert p.to_dict()["coactivation_top_pairs"][0]["coactivation"] == 1.0


# ------------------------------------------------------------------------------------ token overlap
def test_token_overlap_disjoint_planted_and_random():
    n, e = 4000, 4
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 20, n)
    ids = np.where(tokens[:, None] < 10, [[0, 1]], [[2, 3]]).astype(np.int32)
    o = token_overlap(tokens, ids, e, n_perm=5)
    assert o.matrix[0, 1] == 1.0 and o.matrix[0, 2] == 0.0 and o.matrix[2, 3] == 1.0
    assert o.mean == pytest.approx(2 / 6)                          # two of six pairs share all tokens
    assert o.null_mean > 0.9                                       # permuted token ids: every expert sees all
    r = token_overlap(rng.integers(0, 3000, n), random_routing(n, 8, 2, 8), 8, n_perm=5)
    assert abs(r.mean - r.null_mean) < 5 * r.null_std + 0.01


# ---------------------------------------------------------------------------- domain specialisation
def test_domain_specialisation_planted_and_nothing_there():
    n_docs, per_doc, e, k = 60, 50, 8, 2
    n = n_docs * per_doc
    doc_index = np.repeat(np.arange(n_docs), per_doc)
    labels = ["code" if d % 3 == 0 else "prose" for d in range(n_docs)]
    ids = random_routing(n, e, k, 9)
    code = np.isin(doc_index, np.flatnonzero(np.array(labels) == "code"))
    ids[code, 0] = 7
    ids[code, 1] = np.where(ids[code, 1] == 7, 6, ids[code, 1])
    out = {d.label: d for d in domain_specialisation(ids, doc_index, labels, e, n_boot=200, n_perm=100)}
    c = out["code"]
    assert c.share[7] == 1.0 and c.specialisation[7] == pytest.approx(e / k)
    assert c.share.sum() == pytest.approx(k) and c.num_documents == 20
    assert c.p_value < 0.05 and c.max_specialisation > c.max_specialisation_null
    assert abs(out["prose"].specialisation[7] - 1) < 0.2                 # prose is routed at random
    assert c.lift_over_layer[7] > 1.5 and out["prose"].lift_over_layer[7] < 1
    flat = domain_specialisation(random_routing(n, e, k, 12), doc_index, labels, e, n_boot=200, n_perm=100)
    for d in flat:
        assert np.abs(d.specialisation - 1).max() < 0.3 and d.p_value > 0.01
        assert np.all(d.share_low <= d.share + 1e-12) and np.all(d.share_high >= d.share - 1e-12)
    assert domain_specialisation(ids, doc_index, [None] * n_docs, e) == []


# ------------------------------------------------------------------------------------------- traces
def test_router_metrics_on_traces_with_a_compare_trace(tmp_path):
    n, e, k = 1200, 8, 2
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, 40, n)
    docs = np.repeat(np.arange(12), 100)
    a, b = random_routing(n, e, k, 12), random_routing(n, e, k, 13)
    w = np.full((n, k), 0.5, np.float32)
    ta = write_trace(tmp_path / "a", {1: (a, w, None), 3: (a, w, None)}, tokens, docs, num_experts=e, top_k=k)
    tb = write_trace(tmp_path / "b", {1: (b, w, None), 3: (a, w, None)}, tokens, docs, num_experts=e, top_k=k)
    labels = {d: ("x" if d < 6 else "y") for d in range(12)}
    res = router_metrics(ta, doc_labels=labels, compare=tb, min_count=5, n_perm=5, n_boot=200)
    assert res.layer(3).saturation.topk.estimate == 1.0
    assert abs(res.layer(1).saturation.topk.estimate - res.layer(1).saturation.topk_baseline) < 0.05
    direct = layer_metrics(a, tokens, e, layer=1, doc_ids=docs, doc_labels=labels, compare_ids=b, min_count=5,
                           n_perm=5, n_boot=200)
    assert res.layer(1).to_dict() == direct.to_dict()
    d = res.to_dict()["layers"][0]
    for key in ("layer", "selection_frequency", "vocabulary_specialisation"):
        assert key in d
    assert sum(d["selection_frequency"]) == pytest.approx(k)
    assert {x["label"] for x in d["domain_specialisation"]} == {"x", "y"}
    other = write_trace(tmp_path / "c", {1: (b, w, None), 3: (b, w, None)}, (tokens + 1) % 40, docs,
                        num_experts=e, top_k=k)
    with pytest.raises(ValueError, match="same tokens"):
        router_metrics(ta, compare=other)
    shorter = write_trace(tmp_path / "d", {1: (b[:600], w[:600], None)}, tokens[:600], docs[:600], num_experts=e,
                          top_k=k)
    with pytest.raises(ValueError, match="600 tokens"):
        router_metrics(ta, compare=shorter)
    with pytest.raises(ValueError, match=r"layers \[2\]"):
        router_metrics(ta, [2])
