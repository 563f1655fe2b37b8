"""expert_profile on hand-built traces: a planted expert (one token, one domain, one partner) and uniform routing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lazarus_core.analysis.expert_profile import coactivation, expert_profile
from lazarus_core.routing.trace_reader import LayerTrace, TokenSpan, Trace

E, K, LAYER = 4, 2, 3


def _trace(token_ids, doc_ids, topk_ids, topk_weights, logits=None) -> Trace:
    n = len(token_ids)
    positions = np.zeros(n, np.int32)
    for i in range(1, n):
        positions[i] = 0 if doc_ids[i] != doc_ids[i - 1] else positions[i - 1] + 1
    meta = {"moe_layers": [LAYER], "num_tokens": n, "num_experts": E, "top_k": K, "has_logits": logits is not None,
            "shards": [], "num_documents": int(doc_ids.max()) + 1}
    span = TokenSpan(np.asarray(token_ids, np.int32), np.asarray(doc_ids, np.int32), positions,
                     {LAYER: LayerTrace(LAYER, np.asarray(topk_ids, np.int32), np.asarray(topk_weights, np.float32),
                                        None if logits is None else np.asarray(logits, np.float16))})
    return Trace(Path("planted"), meta, [span])


def _planted(seed=0, n_docs=20, per_doc=50):
    """Expert 0 gets token 7 (only in even 'math' documents), always together with expert 1, weight 0.7."""
    rng = np.random.default_rng(seed)
    n = n_docs * per_doc
    doc_ids = np.repeat(np.arange(n_docs), per_doc)
    tokens = rng.integers(10, 20, n)
    planted = (doc_ids % 2 == 0) & (rng.random(n) < 0.4)
    tokens[planted] = 7
    ids = np.zeros((n, K), int)
    weights = np.zeros((n, K))
    logits = rng.normal(0, 1, (n, E))
    for t in range(n):
        if planted[t]:
            ids[t], weights[t] = [0, 1], [0.7, 0.2]
        else:
            ids[t] = rng.choice([1, 2, 3], 2, replace=False)
            weights[t] = [0.5, 0.3]
    logits[:, 0] -= 2.0
    star = int(np.flatnonzero(planted)[5])
    logits[star, 0] = 9.0
    labels = {d: ("math" if d % 2 == 0 else "prose") for d in range(n_docs)}
    return _trace(tokens, doc_ids, ids, weights, logits), planted, star, labels


def test_planted_expert_profile():
    trace, planted, star, labels = _planted()
    p = expert_profile(trace, LAYER, 0, doc_labels=labels, min_count=3)
    n_e = int(planted.sum())
    assert p.load.estimate == pytest.approx(n_e / len(planted)) and p.load.low < p.load.estimate < p.load.high
    assert p.uniform_load == K / E
    assert p.primary_share.estimate == pytest.approx(p.load.estimate)
    assert p.mean_weight.estimate == pytest.approx(0.7) and p.mean_weight.low == pytest.approx(0.7, abs=1e-6)
    # the planted token is the top token, routed every time, lift = 1 / load
    top = p.top_tokens[0]
    assert top.key == "7" and top.routed == top.count == n_e and top.lift == pytest.approx(1 / p.load.estimate)
    assert len(p.top_tokens) == 1                       # no other token ever reaches expert 0
    # domains: every routed token is in a math document, none in prose
    dom = {d.key: d for d in p.domains}
    assert dom["prose"].routed == 0 and dom["math"].routed == n_e
    assert dom["math"].lift == pytest.approx(dom["math"].share.estimate / (K / E))
    assert dom["math"].share.method == "bootstrap-documents"
    # the planted top logit is the first context, and it is the highest logit of its token
    assert p.top_logit_contexts[0].row == star and p.top_logit_contexts[0].rank == 0 and p.top_logit_contexts[0].selected
    assert p.top_logit_contexts[0].logit == pytest.approx(9.0)
    # co-activation: expert 1 always, 2 and 3 never; expected counts under independence sum to n_e * (k - 1)
    co = {c.expert: c for c in p.coactivated}
    assert co[1].count == n_e and co[2].count == co[3].count == 0
    assert sum(c.expected for c in p.coactivated) == pytest.approx(n_e * (K - 1))
    # the independent-picks null spreads expert 0's partner slot over 1..3 by their loads, so 1 is over-represented
    assert co[1].expected < 0.6 * n_e and co[1].ratio > 1.6 and co[2].expected > 0
    assert p.loss is None
    d = p.to_dict()
    assert {"load", "uniform_load", "top_tokens", "top_trigrams", "domains", "mean_weight", "top_logit_contexts",
            "coactivated", "loss"} <= set(d)
    assert set(p.tables()) == {"tokens", "trigrams", "domains", "coactivation", "logit_contexts"}


def test_uniform_routing_shows_nothing():
    """Uniform random top-k: load at k/E within its interval, co-activation at its expectation, no domain lift."""
    rng = np.random.default_rng(1)
    n_docs, per_doc = 40, 100
    n = n_docs * per_doc
    doc_ids = np.repeat(np.arange(n_docs), per_doc)
    ids = np.array([rng.choice(E, K, replace=False) for _ in range(n)])
    trace = _trace(rng.integers(10, 30, n), doc_ids, ids, np.full((n, K), 0.5))
    labels = {d: ("a" if d % 2 else "b") for d in range(n_docs)}
    p = expert_profile(trace, LAYER, 2, doc_labels=labels)
    assert p.load.low <= K / E <= p.load.high
    assert p.load_documents.low <= K / E <= p.load_documents.high
    for d in p.domains:
        assert d.share.low <= K / E <= d.share.high
    for c in p.coactivated:
        assert abs(c.ratio - 1.0) < 0.15
    # the exact uniform expectation of a pair: n * k (k - 1) / (E (E - 1))
    uniform_pair = n * K * (K - 1) / (E * (E - 1))
    assert np.mean([c.expected for c in p.coactivated]) == pytest.approx(uniform_pair, rel=0.05)
    assert p.top_logit_contexts is None and p.logit_mean is None


def test_coactivation_when_the_expert_is_everywhere_expects_the_others_loads():
    ids = np.array([[0, 1], [0, 2], [0, 3], [0, 1]])
    rows = {c.expert: c for c in coactivation(ids, 0, 4)}
    assert [rows[b].count for b in (1, 2, 3)] == [2, 1, 1]
    assert [rows[b].expected for b in (1, 2, 3)] == pytest.approx([2, 1, 1])     # P(0 and b) = P(b)
    assert all(rows[b].ratio == pytest.approx(1.0) for b in (1, 2, 3))


@pytest.mark.parametrize("layer,expert,message", [(5, 0, "--layer 5"), (LAYER, 4, "--expert 4 is out of range")])
def test_bad_arguments_name_the_flag(layer, expert, message):
    trace, *_ = _planted(n_docs=2, per_doc=30)
    with pytest.raises(ValueError, match=message):
        expert_profile(trace, layer, expert)
