"""Expert similarity: CKA (unbiased, biased) and cosine on planted answers, random floor, noise ceiling, intervals."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lazarus_core.analysis.expert_similarity import (
    cosine_similarity_matrix,
    expert_similarity,
    hsic_matrix,
    linear_cka,
    linear_cka_matrix,
    random_expert_outputs,
    randomized_experts,
    trace_expert_similarity,
)


def _hsic_reference(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    """Readable Gram-matrix HSIC: Song et al. 2012 eq. 5, or tr(K H L H) / (n - 1)^2."""
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T
    if not unbiased:
        h = np.eye(n) - 1.0 / n
        return float(np.trace(k @ h @ l @ h) / (n - 1) ** 2)
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return float((np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3)))


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_hsic_matches_the_gram_matrix_formula(unbiased):
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((3, 37, 11)) + 2.0          # odd sizes, non-zero means
    xs[2] = xs[0] @ rng.standard_normal((11, 11)) * 0.3 + xs[2] * 0.5
    got = hsic_matrix(xs, unbiased=unbiased).numpy()
    want = np.array([[_hsic_reference(xs[i], xs[j], unbiased) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_cka_is_one_for_an_orthogonal_transform_and_an_isotropic_scaling(unbiased):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((101, 23))
    q, _ = np.linalg.qr(rng.standard_normal((23, 23)))
    assert linear_cka(x, x @ q, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, 3.7 * (x @ q), unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, x + 5.0, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)   # a shift
    # and not for a non-orthogonal map: the test can fail
    assert linear_cka(x, x * np.linspace(0.1, 3.0, 23), unbiased=unbiased) < 0.95


def test_unbiased_cka_is_about_zero_for_independent_gaussians_where_the_biased_one_is_not():
    rng = np.random.default_rng(3)
    n, d = 24, 64                                        # small n: the biased estimator's regime
    unbiased, biased = [], []
    for _ in range(40):
        x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        unbiased.append(linear_cka(x, y))
        biased.append(linear_cka(x, y, unbiased=False))
    unbiased, biased = np.array(unbiased), np.array(biased)
    assert abs(unbiased.mean()) < 3 * unbiased.std() / np.sqrt(len(unbiased)) + 0.01
    assert biased.mean() > 0.5                           # about d / (n + d) ~ 0.7
    assert biased.min() > unbiased.max()


def test_cka_of_different_widths_and_bad_shapes():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 8))
    y = np.concatenate([x, np.zeros((50, 5))], axis=1)   # extra zero columns change no kernel
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-10)
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, y[:40])
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], x[:3])


def test_dense_and_pairwise_kernel_inner_paths_agree(monkeypatch):
    import lazarus_core.analysis.expert_similarity as es

    rng = np.random.default_rng(5)
    for shape in [(60, 4, 9), (12, 3, 40)]:              # d < n and d > n
        outputs = rng.standard_normal(shape)
        dense = linear_cka_matrix(outputs)
        monkeypatch.setattr(es, "_MAX_DENSE_ENTRIES", 1)
        pairwise = linear_cka_matrix(outputs)
        monkeypatch.undo()
        np.testing.assert_allclose(pairwise, dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_expert_similarity_via_cached_grams_matches_the_direct_path(monkeypatch, unbiased):
    import lazarus_core.analysis.expert_similarity as es

    rng = np.random.default_rng(11)
    outputs, floor = _planted_groups(rng, s=60, h=6), rng.standard_normal((60, 8, 6))
    cached = expert_similarity(outputs, "cka", random_outputs=floor, unbiased=unbiased).to_dict()
    monkeypatch.setattr(es, "_MAX_DENSE_ENTRIES", 1000)       # no Gram cache, feature-space path
    direct = expert_similarity(outputs, "cka", random_outputs=floor, unbiased=unbiased).to_dict()
    np.testing.assert_allclose(cached["matrix"], direct["matrix"], atol=1e-9)
    assert cached["floor"]["excess"] == pytest.approx(direct["floor"]["excess"], abs=1e-7)
    assert cached["ceiling"]["split_half_r"] == pytest.approx(direct["ceiling"]["split_half_r"], abs=1e-7)
    assert cached["ceiling"]["reliability"] == pytest.approx(direct["ceiling"]["reliability"], abs=1e-7)


def test_cosine_on_planted_identical_opposite_and_independent_experts():
    rng = np.random.default_rng(6)
    v = rng.standard_normal((300, 64))
    outputs = np.stack([v, 2.0 * v, -v, rng.standard_normal((300, 64))], axis=1)
    c = cosine_similarity_matrix(outputs)
    assert c[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert c[0, 2] == pytest.approx(-1.0, abs=1e-12)
    assert abs(c[0, 3]) < 0.05
    np.testing.assert_allclose(np.diag(c), 1.0, atol=1e-12)
    res = expert_similarity(outputs, "cosine")
    assert res.estimator is None and res.matrix.shape == (4, 4)
    assert res.off_diagonal.most_similar == (0, 1)
    assert res.off_diagonal.min == pytest.approx(-1.0, abs=1e-12)


def _planted_groups(rng, s=400, h=24, noise=0.3):
    """Experts 0-3 share one linear map of the input, experts 4-7 another, each with its own small part."""
    x = rng.standard_normal((s, h))
    maps = [rng.standard_normal((h, h)) for _ in range(2)]
    return np.stack([x @ maps[e // 4] + noise * x @ rng.standard_normal((h, h)) for e in range(8)], axis=1)


def test_planted_groups_are_found_and_the_pattern_is_reliable():
    rng = np.random.default_rng(7)
    outputs = _planted_groups(rng)
    res = expert_similarity(outputs, "cka", groups=np.repeat(np.arange(40), 10))
    within = [res.matrix[i, j] for i in range(8) for j in range(8) if i < j and i // 4 == j // 4]
    between = [res.matrix[i, j] for i in range(8) for j in range(8) if i < j and i // 4 != j // 4]
    assert min(within) > max(between)
    assert res.ceiling.reliability > 0.9
    assert res.off_diagonal.mean.method == "half-sample-documents" and res.off_diagonal.mean.n_units == 40
    assert res.off_diagonal.mean.low < res.off_diagonal.mean.estimate < res.off_diagonal.mean.high
    few = expert_similarity(outputs, "cka", groups=np.repeat(np.arange(4), 100), n_splits=4)
    assert few.off_diagonal.mean.method == "half-sample-tokens" and few.off_diagonal.mean.n_units == 400


def test_nothing_there_independent_experts_score_zero_and_the_pattern_is_noise():
    rng = np.random.default_rng(8)
    outputs = rng.standard_normal((300, 8, 16))
    res = expert_similarity(outputs, "cka", seed=1)
    assert res.off_diagonal.mean.low < 0.0 < res.off_diagonal.mean.high
    assert abs(res.off_diagonal.mean.estimate) < 0.02
    assert abs(res.ceiling.split_half_r.estimate) < 0.4
    assert res.ceiling.max_similarity == 1.0
    biased = expert_similarity(outputs, "cka", unbiased=False)
    assert biased.estimator == "biased" and biased.off_diagonal.mean.low > 0.02   # the biased estimator's offset


def _olmoe_experts():
    from lazarus_core.routing.locate import find_moe_layers
    from tests.routing.tiny_models import tiny_model

    model = tiny_model("olmoe")
    layer = find_moe_layers(model).layers[0]
    return layer.experts, model.config.hidden_size


def test_random_expert_floor_is_well_below_planted_identical_experts():
    from lazarus_core.routing.expert_outputs import each_expert_output

    experts, hidden_size = _olmoe_experts()
    with torch.no_grad():                                # plant: every expert is expert 0
        for p in experts.parameters():
            p.copy_(p[:1].expand_as(p))
    hidden = torch.randn(256, hidden_size)
    with torch.inference_mode():
        outputs = each_expert_output(experts, hidden)
    floor = random_expert_outputs(experts, hidden, seed=3)
    assert floor.shape == tuple(outputs.shape) and floor.dtype == np.float32
    for method in ("cka", "cosine"):
        res = expert_similarity(outputs, method, random_outputs=floor)
        assert res.off_diagonal.mean.estimate == pytest.approx(1.0, abs=1e-6)
        assert res.floor.off_diagonal.mean.estimate < 0.6
        assert res.floor.excess.low > 0.4


def test_randomized_experts_keep_shapes_and_scale_and_leave_the_original_alone():
    experts, _ = _olmoe_experts()
    before = {n: p.detach().clone() for n, p in experts.named_parameters()}
    random = randomized_experts(experts, seed=0)
    for name, p in random.named_parameters():
        orig = before[name]
        assert p.shape == orig.shape
        assert float(p.detach().std()) == pytest.approx(float(orig.std()), rel=0.05)
        assert not torch.allclose(p, orig)
        assert torch.equal(dict(experts.named_parameters())[name], orig)
    again = randomized_experts(experts, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(random.parameters(), again.parameters()))


def test_bad_input():
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match="method"):
        expert_similarity(rng.standard_normal((20, 3, 4)), "pearson")
    with pytest.raises(ValueError, match=r"\[s, E, H\]"):
        expert_similarity(rng.standard_normal((20, 4)), "cka")
    with pytest.raises(ValueError, match="at least 8 tokens"):
        expert_similarity(rng.standard_normal((5, 3, 4)), "cka")
    with pytest.raises(ValueError, match="random_outputs"):
        expert_similarity(rng.standard_normal((20, 3, 4)), "cka", random_outputs=rng.standard_normal((19, 3, 4)))


def _fake_trace(outputs, hidden=None, has_all=True):
    s = outputs.shape[0]
    acts = SimpleNamespace(sample_index=np.arange(0, 2 * s, 2, dtype=np.int64), hidden=hidden,
                           expert_outputs=None, all_expert_outputs=outputs.astype(np.float32))
    return SimpleNamespace(path="fake", layers=[3], has_all_expert_outputs=has_all, has_hidden=hidden is not None,
                           doc_ids=np.repeat(np.arange(2 * s // 20), 20).astype(np.int32),
                           activations=lambda layer: acts)


def test_trace_wrapper_uses_documents_and_names_the_missing_flag():
    rng = np.random.default_rng(10)
    outputs = _planted_groups(rng, s=200)
    (res,) = trace_expert_similarity(_fake_trace(outputs), method="cka", max_tokens=150)
    assert res.layer == 3 and res.num_tokens == 150 and res.floor is None
    assert res.off_diagonal.mean.method == "half-sample-documents"
    np.testing.assert_allclose(res.to_dict()["matrix"], res.matrix, atol=1e-6)
    with pytest.raises(ValueError, match="--all-experts"):
        trace_expert_similarity(_fake_trace(outputs, has_all=False))


def test_the_half_sample_interval_of_the_mean_covers_the_population_value():
    def draw(rng, s):
        x = rng.standard_normal((s, 6))
        base = x @ np.diag([3.0, 2.0, 1.0, 0.5, 0.5, 0.5])
        return np.stack([base + (1.0 + e) * rng.standard_normal((s, 6)) for e in range(4)], axis=1)

    population = np.mean(linear_cka_matrix(draw(np.random.default_rng(99), 40000))[np.triu_indices(4, 1)])
    rng = np.random.default_rng(12)
    hits, widths = 0, []
    for i in range(40):
        mean = expert_similarity(draw(rng, 200), "cka", seed=i).off_diagonal.mean
        hits += mean.low <= population <= mean.high
        widths.append(mean.high - mean.low)
    assert 0.75 <= hits / 40 <= 1.0      # nominal 95 %; about 89 % measured over 150 draws (docs)
    assert np.median(widths) < 0.2                       # and not trivially wide
