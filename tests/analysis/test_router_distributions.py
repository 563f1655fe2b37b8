"""Router distributions: histograms count what they should, per-slot means against a plain reference, uniform baselines."""

from __future__ import annotations

import numpy as np
import pytest

from lazarus_core.analysis.router_distributions import layer_distributions, router_distributions
from tests.analysis.test_router_entropy import reference_probabilities, write_trace


def _routed(logits: np.ndarray, k: int, scoring: str = "softmax"):
    p = reference_probabilities(logits, scoring)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return p, ids.astype(np.int32), np.take_along_axis(p, ids, 1).astype(np.float32)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_views_match_a_plain_reference(scoring):
    rng = np.random.default_rng(0)
    n, e, k = 1203, 12, 3
    logits = (rng.standard_normal((n, e)) * 2).astype(np.float16)
    p, ids, w = _routed(logits, k, scoring)
    docs = np.repeat(np.arange(12), 101)[:n]
    d = layer_distributions(logits, ids, w, docs, scoring=scoring, bins=20, n_boot=200, sample_tokens=None,
                            chunk_rows=100)
    np.testing.assert_allclose([i.estimate for i in d.probability_per_rank], np.sort(p, 1)[:, ::-1][:, :k].mean(0),
                               rtol=1e-5)
    q = w / w.sum(1, keepdims=True)
    np.testing.assert_allclose([i.estimate for i in d.topk_weight_per_rank], q.mean(0), rtol=1e-5)
    assert d.topk_mass.estimate == pytest.approx(np.sort(p, 1)[:, ::-1][:, :k].sum(1).mean(), rel=1e-5)
    assert d.topk_mass.low <= d.topk_mass.estimate <= d.topk_mass.high
    assert sum(d.logits.counts) == sum(d.probabilities.counts) == n * e
    assert sum(d.topk_probabilities.counts) == n * k and sum(d.log10_probabilities.counts) == n * e
    ref_counts, _ = np.histogram(p, bins=20, range=(0.0, 1.0))
    assert np.abs(np.array(d.probabilities.counts) - ref_counts).max() <= 2     # bin edges in fp32 vs fp64
    x = logits.astype(np.float64)
    assert d.logit_mean == pytest.approx(x.mean(), abs=1e-6) and d.logit_std == pytest.approx(x.std(), rel=1e-5)
    assert d.logits.edges[0] == pytest.approx(x.min()) and d.logits.edges[-1] == pytest.approx(x.max())


def test_uniform_router_sits_on_its_baselines():
    n, e, k = 500, 8, 2
    logits = np.zeros((n, e), np.float16)
    ids = np.tile(np.arange(k, dtype=np.int32), (n, 1))
    w = np.full((n, k), 1 / e, np.float32)        # OLMoE-style: not renormalised
    d = layer_distributions(logits, ids, w, n_boot=100).to_dict()
    assert d["mean_probability_per_rank"] == pytest.approx([1 / e] * k)
    assert d["mean_topk_weight_per_rank"] == pytest.approx([1 / k] * k)
    assert d["topk_mass"]["estimate"] == pytest.approx(d["baselines"]["uniform_topk_mass"])
    # every probability is 1/E: one bin of the linear histogram holds them all
    assert max(d["probabilities"]["counts"]) == n * e


def test_peaked_router_is_far_from_its_baselines_and_histograms_sample():
    rng = np.random.default_rng(1)
    n, e, k = 3000, 16, 4
    logits = np.full((n, e), -10.0, np.float16)
    logits[np.arange(n), rng.integers(0, e, n)] = 10.0
    p, ids, w = _routed(logits, k)
    d = layer_distributions(logits, ids, w, np.repeat(np.arange(30), 100), sample_tokens=500, n_boot=100)
    assert d.probability_per_rank[0].estimate > 0.99 and d.topk_mass.estimate > 0.99
    assert d.histogram_tokens == 500 and sum(d.probabilities.counts) == 500 * e
    assert d.topk_mass.low > 4 / 16


def test_trace_level_function_and_missing_logits(tmp_path):
    rng = np.random.default_rng(2)
    n, e, k = 600, 8, 2
    logits = (rng.standard_normal((n, e))).astype(np.float16)
    _, ids, w = _routed(logits, k)
    docs = np.repeat(np.arange(6), 100)
    trace = write_trace(tmp_path / "t", {0: (ids, w, logits), 2: (ids, w, logits)}, rng.integers(0, 30, n), docs,
                        num_experts=e, top_k=k)
    res = router_distributions(trace, [2], n_boot=100)
    direct = layer_distributions(logits, ids, w, docs, layer=2, n_boot=100)
    assert res.layer(2).to_dict() == direct.to_dict()
    assert [entry.layer for entry in res.layers] == [2]
    bare = write_trace(tmp_path / "bare", {0: (ids, w, None)}, rng.integers(0, 30, n), docs, num_experts=e, top_k=k)
    with pytest.raises(ValueError, match="--logits"):
        router_distributions(bare)
    with pytest.raises(ValueError, match=r"layers \[1\]"):
        router_distributions(trace, [1])
