"""Attention-only routing prediction: planted linear routing is recovered, independent labels stay at the majority rate,
the logit decomposition is exact and its shares sum to 1, and the hooks record r, a and h of real decoders."""

from __future__ import annotations

import numpy as np
import pytest

from lazarus_core.analysis.attention_prediction import (fit_linear_probe, logit_decomposition, majority_scores,
                                                        predict_layer, split_documents, token_lookup_scores,
                                                        topk_recall)


def _docs(n: int, n_docs: int, rng) -> np.ndarray:
    return np.sort(rng.integers(0, n_docs, n))


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def test_probe_recovers_routing_that_is_linear_in_the_attention_output():
    rng = np.random.default_rng(1)
    n, h, e, k = 3000, 24, 8, 2
    a = rng.standard_normal((n, h)).astype(np.float32)
    w = rng.standard_normal((e, h))
    logits = a @ w.T                                          # router input = a linear map of a (r = 0)
    ids = _topk(logits, k)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    weights = np.take_along_axis(probs / probs.sum(1, keepdims=True), ids, 1)
    docs = _docs(n, 30, rng)
    test = split_documents(docs, 0.3, seed=0)
    noise = rng.standard_normal((n, h)).astype(np.float32)    # a residual that carries nothing
    res = predict_layer(5, a, ids, rng.integers(0, 50, n), docs, test, num_experts=e, topk_weights=weights,
                        residual=noise, steps=300, l2=1e-4)
    probe = res.predictor("attention_probe")
    assert probe.accuracy.estimate > 0.95 and probe.topk_recall.estimate > 0.93
    assert probe.accuracy.low <= probe.accuracy.estimate <= probe.accuracy.high
    majority = res.predictor("majority").accuracy.estimate
    assert majority < 0.4
    assert res.attention_gain.low > 0.4
    assert res.predictor("residual_probe").accuracy.estimate < majority + 0.1
    assert res.test_tokens == int(test.sum()) and res.train_tokens == n - int(test.sum())


def test_probe_on_independent_labels_stays_at_the_majority_rate():
    rng = np.random.default_rng(2)
    n, h, e, k = 4000, 12, 8, 2
    x = rng.standard_normal((n, h)).astype(np.float32)
    p = np.array([0.35, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02])
    primary = rng.choice(e, n, p=p)
    second = (primary + 1 + rng.integers(0, e - 1, n)) % e
    ids = np.stack([primary, second], 1)
    docs = _docs(n, 40, rng)
    test = split_documents(docs, 0.3, seed=3)
    res = predict_layer(0, x, ids, rng.integers(0, 30, n), docs, test, num_experts=e, steps=200)
    probe = res.predictor("attention_probe").accuracy.estimate
    majority = res.predictor("majority").accuracy.estimate
    assert majority == pytest.approx(float(np.mean(ids[test, 0] == 0)))
    assert abs(probe - majority) < 0.05
    assert res.attention_gain.low < 0.02


def test_token_lookup_learns_a_token_determined_primary():
    rng = np.random.default_rng(3)
    n, e = 2000, 8
    tokens = rng.integers(0, 40, n)
    table = rng.integers(0, e, 40)
    ids = np.stack([table[tokens], (table[tokens] + 1) % e], 1)
    train = rng.random(n) < 0.7
    s = token_lookup_scores(tokens[train], ids[train], tokens[~train], e)
    seen = np.isin(tokens[~train], tokens[train])
    assert (np.argmax(s, 1)[seen] == ids[~train, 0][seen]).all()
    assert (topk_recall(s, ids[~train])[seen] == 1.0).all()
    maj = majority_scores(ids[train], 3, e)
    assert (np.argmax(maj, 1) == np.bincount(ids[train, 0], minlength=e).argmax()).all()


def test_linear_probe_sigmoid_fits_separable_labels():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((800, 6)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0], 1).astype(np.float32)
    probe = fit_linear_probe(x, y, loss="sigmoid", l2=1e-4, steps=200)
    assert ((probe.scores(x) > 0) == (y > 0.5)).mean() > 0.97
    with pytest.raises(ValueError, match="loss"):
        fit_linear_probe(x, y, loss="hinge")


def test_split_is_by_whole_documents_and_seeded():
    docs = np.repeat(np.arange(10), 7)
    test = split_documents(docs, 0.3, seed=5)
    for d in range(10):
        assert len(set(test[docs == d])) == 1
    assert 0 < test.sum() < len(docs)
    assert (split_documents(docs, 0.3, seed=5) == test).all()
    lopsided = np.repeat(np.arange(12), [1750] + [27] * 11)          # one long document and short ones
    for seed in range(4):
        held = split_documents(lopsided, 0.3, seed=seed)
        assert 0 < held.sum() <= 0.3 * len(lopsided) and not held[0]
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(np.zeros(5, int))
    with pytest.raises(ValueError, match="--test-fraction"):
        split_documents(docs, 1.5)


def _decomposition_case(rng, n=600, h=16, e=6, attention_dims=None):
    r = rng.standard_normal((n, h)) * 3.0
    a = rng.standard_normal((n, h))
    if attention_dims is not None:                     # r and a in disjoint coordinates
        r[:, attention_dims] = 0.0
        a[:, [i for i in range(h) if i not in attention_dims]] = 0.0
    g = rng.uniform(0.5, 1.5, h)
    x = r + a
    inv_rms = 1.0 / np.sqrt((x ** 2).mean(1) + 1e-6)
    w = rng.standard_normal((e, h))
    b = rng.standard_normal(e)
    logits = (g * x * inv_rms[:, None]) @ w.T + b
    return r, a, inv_rms, g, w, b, logits


def test_decomposition_is_exact_and_its_shares_sum_to_one():
    rng = np.random.default_rng(6)
    r, a, inv_rms, g, w, b, logits = _decomposition_case(rng)
    docs = np.repeat(np.arange(20), 30)
    d = logit_decomposition(r, a, inv_rms, g, w, b, logits=logits, doc_ids=docs, seed=0)
    assert d.reconstruction_error < 1e-10
    assert d.attention_share.estimate + d.residual_share.estimate == pytest.approx(1.0, abs=1e-9)
    assert d.attention_alone + d.residual_alone + d.cross_term == pytest.approx(1.0, abs=1e-9)
    assert d.attention_share.low <= d.attention_share.estimate <= d.attention_share.high
    # r has 9x the variance of a: a router reading both alike gives attention about a tenth, as random routers do
    assert 0.03 < d.attention_share.estimate < 0.25
    rr = d.random_router_attention_share
    assert rr.low <= d.attention_share.estimate + 0.1 and d.attention_norm_share == pytest.approx(0.1, abs=0.03)


def test_decomposition_of_a_router_that_reads_only_the_attention_part():
    rng = np.random.default_rng(7)
    h = 16
    att = list(range(8, 16))
    r, a, inv_rms, g, w, b, _ = _decomposition_case(rng, h=h, attention_dims=att)
    w[:, :8] = 0.0                                    # the router ignores the residual coordinates
    logits = (g * (r + a) * inv_rms[:, None]) @ w.T + b
    d = logit_decomposition(r, a, inv_rms, g, w, b, logits=logits, seed=1)
    assert d.attention_share.estimate == pytest.approx(1.0, abs=1e-9)
    assert d.residual_share.estimate == pytest.approx(0.0, abs=1e-9)
    assert d.random_router_attention_share.high < 0.9      # the baseline does not read it so


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v3"])
def test_hooks_record_the_parts_of_the_router_input(family):
    from lazarus_core.analysis.attention_features import attention_features
    from lazarus_core.routing.locate import find_moe_layers
    from tests.routing.tiny_models import tiny_model

    model = tiny_model(family)
    layer = max(find_moe_layers(model).layers)
    windows = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14]]
    batched = attention_features(model, windows, [layer], batch_size=3)
    single = attention_features(model, windows, [layer], batch_size=1)
    f, s = batched.layers[layer], single.layers[layer]
    assert f.attention.shape == (13, model.config.hidden_size)
    np.testing.assert_allclose(f.attention, s.attention, atol=1e-5)       # padding dropped, masked correctly
    np.testing.assert_array_equal(f.topk_ids, s.topk_ids)
    d = logit_decomposition(f.residual, f.attention, f.inv_rms, f.norm_weight, f.router_weight, f.router_bias,
                            logits=f.logits, doc_ids=batched.doc_ids)
    assert d.reconstruction_error < 1e-5
    np.testing.assert_allclose(f.norm_weight * (f.residual + f.attention) * f.inv_rms[:, None], f.router_input,
                               atol=1e-5)
    assert batched.doc_ids.tolist() == [0] * 6 + [1] * 3 + [2] * 4 and batched.positions[6] == 0
