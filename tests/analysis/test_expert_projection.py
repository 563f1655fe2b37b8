"""Expert projection: PCA on a known spectrum, planted clusters separate, identical experts do not, UMAP missing."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from lazarus_core.analysis.expert_projection import (
    _permute_within_blocks,
    expert_projection,
    knn_predictions,
    pca_2d,
    trace_expert_projection,
)
from lazarus_core.errors import BackendUnavailableError


def _planted_clusters(rng, s=300, e=8, h=16, radius=4.0, spread=0.3):
    """Expert e's output = a point on a circle (in a random 2-D plane of R^h) + small token noise."""
    q, _ = np.linalg.qr(rng.standard_normal((h, h)))
    angles = 2 * np.pi * np.arange(e) / e
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1) @ q[:2]
    return centres[None] + spread * rng.standard_normal((s, e, h))


def test_pca_recovers_a_known_spectrum_and_the_lowrank_path_agrees(monkeypatch):
    import lazarus_core.analysis.expert_projection as ep

    rng = np.random.default_rng(0)
    sd = np.array([3.0, 2.0, 1.0, 0.5, 0.5])
    x = rng.standard_normal((4000, 5)) * sd + 7.0
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    x = x @ q
    coords, ratio = pca_2d(x)
    want = sd[:2] ** 2 / np.sum(sd ** 2)
    np.testing.assert_allclose(ratio, want, rtol=0.05)
    assert coords.shape == (4000, 2) and coords.dtype == np.float32
    np.testing.assert_allclose(coords.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(coords.var(axis=0, ddof=1) / np.var(x, axis=0, ddof=1).sum(), ratio, rtol=1e-4)
    monkeypatch.setattr(ep, "_EXACT_SVD_ENTRIES", 1)
    coords_lr, ratio_lr = pca_2d(x)
    np.testing.assert_allclose(ratio_lr, ratio, rtol=1e-6)
    np.testing.assert_allclose(np.abs(coords_lr), np.abs(coords), atol=1e-3)   # up to the sign of each axis


def test_knn_predictions_leave_the_point_out():
    coords = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [10, 0], [10.1, 0], [10.2, 0]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(knn_predictions(coords, labels, k=2, chunk=4), labels)
    lonely = np.array([0, 0, 1, 1, 1, 1])                # point 2's two neighbours are both label 0
    assert knn_predictions(coords, lonely, k=2)[2] == 0
    with pytest.raises(ValueError, match="k="):
        knn_predictions(coords, labels, k=6)


def test_permutation_stays_within_each_token():
    rng = np.random.default_rng(1)
    blocks = np.repeat(np.arange(50), 4)[rng.permutation(200)]
    labels = np.tile(np.arange(4), 50)[np.argsort(np.argsort(blocks, kind="stable"), kind="stable")]
    perm = _permute_within_blocks(labels, blocks, rng)
    for b in range(50):
        assert sorted(perm[blocks == b]) == sorted(labels[blocks == b])
    assert not np.array_equal(perm, labels)


def test_planted_expert_clusters_separate_far_above_the_null():
    rng = np.random.default_rng(2)
    outputs = _planted_clusters(rng)
    res = expert_projection(outputs, "pca", n_permutations=10, groups=np.repeat(np.arange(30), 10))
    sep = res.separation
    assert res.explained_variance_ratio.sum() > 0.8
    assert sep.accuracy.estimate > 0.95 and sep.accuracy.method == "bootstrap-documents"
    assert sep.majority_rate == pytest.approx(1 / 8)
    assert sep.permuted_high < 0.3
    assert sep.p_value == pytest.approx(1 / 11)
    assert sep.accuracy.low > sep.permuted_high
    d = res.to_dict(points=True)
    assert len(d["points"]["x"]) == d["num_points"] == 300 * 8
    assert d["separation"]["k"] == 5


@pytest.mark.parametrize("noise", [0.0, 1e-3], ids=["identical", "identical-plus-noise"])
def test_identical_experts_are_not_separated(noise):
    rng = np.random.default_rng(3)
    shared = rng.standard_normal((200, 1, 16))
    outputs = np.repeat(shared, 8, axis=1) + noise * rng.standard_normal((200, 8, 16))
    res = expert_projection(outputs, "pca", n_permutations=10, seed=4)
    sep = res.separation
    assert sep.accuracy.estimate <= sep.majority_rate
    assert sep.p_value > 0.05
    assert sep.permuted_low <= sep.accuracy.estimate + 0.02


def test_max_points_keeps_whole_tokens_and_records_trace_indices():
    rng = np.random.default_rng(5)
    outputs = _planted_clusters(rng, s=100, e=4)
    res = expert_projection(outputs, max_points=120, n_permutations=3, token_index=np.arange(100) * 7)
    assert res.coords.shape == (120, 2) and res.num_tokens == 100
    assert set(np.bincount(res.token // 7)[np.unique(res.token // 7)]) == {4}
    assert np.all(res.token % 7 == 0)


def test_umap_without_umap_learn_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)       # import umap -> ImportError
    with pytest.raises(BackendUnavailableError, match="pip install umap-learn"):
        expert_projection(np.zeros((10, 2, 3)), "umap")


def test_bad_input_and_the_trace_wrapper():
    with pytest.raises(ValueError, match="method"):
        expert_projection(np.zeros((10, 2, 3)), "tsne")
    with pytest.raises(ValueError, match=r"\[s, E, H\]"):
        expert_projection(np.zeros((10, 3)))
    rng = np.random.default_rng(6)
    outputs = _planted_clusters(rng, s=60, e=4).astype(np.float32)
    acts = SimpleNamespace(sample_index=np.arange(60, dtype=np.int64) * 2, hidden=None, expert_outputs=None,
                           all_expert_outputs=outputs)
    trace = SimpleNamespace(path="fake", layers=[1], has_all_expert_outputs=True,
                            doc_ids=np.repeat(np.arange(12), 10), activations=lambda layer: acts)
    (res,) = trace_expert_projection(trace, max_tokens=40, n_permutations=3)
    assert res.layer == 1 and res.num_tokens == 40
    assert res.separation.accuracy.method == "bootstrap-documents"
    trace.has_all_expert_outputs = False
    with pytest.raises(ValueError, match="--all-experts"):
        trace_expert_projection(trace)
