"""Prefetch prediction: experts that are a linear function of the early hidden state are recalled, random ones stay at
the baselines, the previous-token baseline catches runs, and the byte / time accounting follows its formula."""

from __future__ import annotations

import numpy as np
import pytest

from lazarus_core.analysis.task_prediction import (prefetch_hits, previous_token_scores, ranked_sets,
                                                   task_prediction)


def _trace(rng, n=3000, n_docs=30, window=50):
    docs = np.sort(rng.integers(0, n_docs, n))
    positions = np.zeros(n, np.int64)
    for i in range(1, n):
        positions[i] = 0 if docs[i] != docs[i - 1] or positions[i - 1] + 1 >= window else positions[i - 1] + 1
    return docs, positions


def test_linear_future_experts_are_recalled():
    rng = np.random.default_rng(0)
    n, h, e, k = 3000, 20, 8, 2
    docs, positions = _trace(rng, n)
    hidden = rng.standard_normal((n, h)).astype(np.float32)
    routing = {l: np.argsort(-(hidden @ rng.standard_normal((h, e))), 1)[:, :k] for l in (3, 5)}
    routing[0] = rng.integers(0, e, (n, k))          # a layer before the probe layer is ignored
    res = task_prediction(hidden, np.arange(n), docs, positions, routing, probe_layer=1, num_experts=e,
                          expert_bytes={3: 1000, 5: 1000}, bandwidth_gbs=1.0, steps=200, l2=1e-4)
    assert [l.layer for l in res.layers] == [3, 5]
    for l in res.layers:
        probe = l.prefetcher("probe")
        assert probe.recall.estimate > 0.85 and probe.precision.estimate == pytest.approx(probe.recall.estimate)
        assert l.recall_gain.low > 0.3
        assert l.curve[-1]["probe"] == pytest.approx(1.0) and len(l.curve) == e
        c = l.cost
        assert c.resident_bytes == 2000 and c.all_bytes == 8000 and c.loads_avoided == pytest.approx(0.75)
        assert c.prefetch_ms == pytest.approx(2000 / 1e9 * 1e3)
        assert c.miss_ms_per_token == pytest.approx(k * probe.miss_rate * 1000 / 1e9 * 1e3)
        assert c.miss_ms_per_token < c.miss_ms_per_token_most_frequent


def test_random_future_experts_stay_at_the_baseline():
    rng = np.random.default_rng(1)
    n, h, e, k = 3000, 16, 8, 2
    docs, positions = _trace(rng, n)
    hidden = rng.standard_normal((n, h)).astype(np.float32)
    routing = {4: np.stack([rng.permutation(e)[:k] for _ in range(n)])}
    res = task_prediction(hidden, np.arange(n), docs, positions, routing, probe_layer=2, num_experts=e, steps=100)
    layer = res.layers[0]
    probe, freq = layer.prefetcher("probe").recall.estimate, layer.prefetcher("most_frequent").recall.estimate
    assert abs(probe - k / e) < 0.05 and abs(freq - k / e) < 0.05
    assert layer.recall_gain.low < 0.02
    assert layer.cost is None


def test_previous_token_baseline_catches_runs():
    rng = np.random.default_rng(2)
    n, e, k = 2000, 8, 2
    docs, positions = _trace(rng, n, window=40)
    ids = np.zeros((n, k), np.int64)
    for i in range(n):                              # experts change only at window starts
        ids[i] = ids[i - 1] if positions[i] > 0 else rng.permutation(e)[:k]
    res = task_prediction(rng.standard_normal((n, 4)).astype(np.float32), np.arange(n), docs, positions, {1: ids},
                          probe_layer=0, num_experts=e, steps=50)
    prev = res.layers[0].prefetcher("previous_token").recall
    assert prev.estimate > 0.95 and res.layers[0].best_baseline == "previous_token"


def test_helpers_and_errors():
    scores = previous_token_scores(np.array([[3, 1], [2, 0], [5, 4]]), np.array([0, 1, 2]), np.array([0, 1, 2]),
                                   np.arange(6, dtype=float))
    assert ranked_sets(scores, 2).tolist() == [[5, 4], [3, 1], [2, 0]]   # position 0 falls back to the frequent set
    assert prefetch_hits(np.array([[1, 2]]), np.array([[2, 3]])).tolist() == [1]
    rng = np.random.default_rng(3)
    docs, positions = _trace(rng, 200)
    h = rng.standard_normal((200, 4)).astype(np.float32)
    ids = {1: rng.integers(0, 4, (200, 2))}
    with pytest.raises(ValueError, match="--probe-layer 1 has no later"):
        task_prediction(h, np.arange(200), docs, positions, ids, probe_layer=1, num_experts=4)
    with pytest.raises(ValueError, match="--prefetch-size"):
        task_prediction(h, np.arange(200), docs, positions, ids, probe_layer=0, num_experts=4, prefetch_size=9)
    with pytest.raises(ValueError, match="--bandwidth-gbs"):
        task_prediction(h, np.arange(200), docs, positions, ids, probe_layer=0, num_experts=4, bandwidth_gbs=0)
