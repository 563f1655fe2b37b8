"""Router entropy: planted answers (uniform = log E, one-hot = 0), a float64 reference, and every family's convention."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lazarus_core.analysis.intervals import bootstrap_mean_ci
from lazarus_core.analysis.router_entropy import (
    DocumentBootstrap,
    document_index,
    entropy_from_logits,
    layer_entropy,
    router_entropy,
    topk_entropy,
)
from lazarus_core.routing.trace_writer import LayerBatch, TraceWriter
from lazarus_core.routing.trace_reader import load_trace


def reference_probabilities(logits: np.ndarray, scoring: str) -> np.ndarray:
    """float64 [t, E] router distribution, written plainly."""
    x = np.asarray(logits, dtype=np.float64)
    if scoring == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    s = 1.0 / (1.0 + np.exp(-x))
    return s / s.sum(axis=1, keepdims=True)


def reference_entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


def write_trace(path, layers: dict, token_ids, doc_ids, *, num_experts, top_k, scoring="softmax", family="olmoe"):
    """A hand-made trace: ``layers`` maps layer -> (topk_ids [n, k], topk_weights [n, k], logits [n, E] or None)."""
    has_logits = all(v[2] is not None for v in layers.values())
    meta = {"model": "hand-made", "family": family, "num_experts": num_experts, "top_k": top_k,
            "all_moe_layers": sorted(layers), "weight_convention": {"scoring": scoring}, "corpus": {"sha256": "x"},
            "seq_len": 512}
    writer = TraceWriter(path, meta, sorted(layers), has_logits, shard_tokens=max(1, len(token_ids) // 3 + 1))
    n = len(token_ids)
    positions = np.zeros(n, dtype=np.int32)
    step = 257
    for start in range(0, n, step):
        sl = slice(start, start + step)
        writer.add(np.asarray(token_ids[sl], np.int32), np.asarray(doc_ids[sl], np.int32), positions[sl],
                   {l: LayerBatch(np.asarray(i[sl], np.int32), np.asarray(w[sl], np.float32),
                                  None if g is None else np.asarray(g[sl], np.float16))
                    for l, (i, w, g) in layers.items()}, 1)
    writer.close()
    return load_trace(path)


def _topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    p = reference_probabilities(logits, "softmax")
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return ids.astype(np.int32), np.take_along_axis(p, ids, 1).astype(np.float32)


# ------------------------------------------------------------------------------------ planted answers
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_experts", [8, 64, 61])
def test_uniform_router_has_entropy_log_e(scoring, num_experts):
    logits = np.full((37, num_experts), 0.75, dtype=np.float16)
    h, p_sum = entropy_from_logits(logits, scoring=scoring, chunk_rows=5)
    assert h.dtype == np.float32 and h.shape == (37,)
    np.testing.assert_allclose(h, math.log(num_experts), rtol=1e-6)
    np.testing.assert_allclose(p_sum, 37 / num_experts, rtol=1e-6)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_one_hot_router_has_entropy_zero(scoring):
    logits = np.full((50, 16), -40.0, dtype=np.float16)
    logits[np.arange(50), np.arange(50) % 16] = 40.0
    h, _ = entropy_from_logits(logits, scoring=scoring)
    assert np.all(h >= -1e-6) and h.max() < 1e-6


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_matches_a_float64_reference_on_random_logits(scoring, dtype):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((1001, 37)) * 3).astype(dtype)
    strided = np.asfortranarray(logits)      # not C-contiguous
    h, p_sum = entropy_from_logits(strided, scoring=scoring, chunk_rows=64)
    p = reference_probabilities(logits, scoring)
    np.testing.assert_allclose(h, reference_entropy(p), atol=2e-5)
    np.testing.assert_allclose(p_sum, p.sum(0), rtol=1e-5)


def test_empty_and_bad_input():
    h, p_sum = entropy_from_logits(np.zeros((0, 8), np.float16))
    assert h.shape == (0,) and np.all(p_sum == 0)
    with pytest.raises(ValueError, match="scoring"):
        entropy_from_logits(np.zeros((3, 8), np.float16), scoring="sparsemax")
    with pytest.raises(ValueError, match="tokens, experts"):
        entropy_from_logits(np.zeros(8, np.float16))


def test_topk_entropy_is_scale_free_and_bounded_by_log_k():
    w = np.array([[0.25, 0.25, 0.25, 0.25], [2.5, 0, 0, 0], [0.3, 0.1, 0.1, 0.0]], dtype=np.float32)
    h = topk_entropy(w)
    q = w[2] / w[2].sum()
    np.testing.assert_allclose(h, [math.log(4), 0.0, -(q[q > 0] * np.log(q[q > 0])).sum()], atol=1e-6)
    np.testing.assert_allclose(topk_entropy(w * 7.0), h, atol=1e-6)     # DeepSeek's scaling factor drops out


def test_marginal_baseline_separates_decisive_from_indifferent_routing():
    n, e = 4000, 8
    rng = np.random.default_rng(2)
    docs = np.repeat(np.arange(40), 100)
    # decisive: each token one-hot on a random expert -> per-token ~0, marginal ~log E
    decisive = np.full((n, e), -30.0, np.float16)
    decisive[np.arange(n), rng.integers(0, e, n)] = 30.0
    ids, w = _topk(decisive, 2)
    s, h, _ = layer_entropy(decisive, w, docs, n_boot=200)
    assert s.mean_entropy_nats < 1e-4 and s.marginal_entropy_nats > math.log(e) - 0.01
    assert s.mutual_information_nats > math.log(e) - 0.02
    # indifferent: every token has the same (non-uniform) distribution -> mean == marginal, MI = 0
    same = np.tile(rng.standard_normal(e).astype(np.float16), (n, 1))
    ids, w = _topk(same, 2)
    s, _, _ = layer_entropy(same, w, docs, n_boot=200)
    assert abs(s.mutual_information_nats) < 1e-4
    assert s.router.mean_nats.low <= s.mean_entropy_nats <= s.router.mean_nats.high
    d = s.to_dict()
    for key in ("layer", "mean_entropy_nats", "mean_normalized_entropy", "marginal_entropy_nats", "max_entropy_nats"):
        assert key in d
    assert d["max_entropy_nats"] == pytest.approx(math.log(e))
    assert sum(d["entropy_histogram"]["counts"]) == n


def test_document_bootstrap_equals_the_shared_interval_helper():
    rng = np.random.default_rng(3)
    values = rng.random(700)
    docs = np.sort(rng.integers(5, 60, 700))
    ours = DocumentBootstrap(*document_index(docs, 700), n_boot=300, seed=4).mean(values)
    ref = bootstrap_mean_ci(values, docs, n_boot=300, seed=4)
    assert ours == ref
    one_doc = DocumentBootstrap(*document_index(np.zeros(50), 50), n_boot=100).mean(values[:50])
    assert one_doc.method == "bootstrap-tokens"


# ------------------------------------------------------------------------------------------- traces
def test_router_entropy_on_a_hand_made_trace_and_without_logits(tmp_path):
    rng = np.random.default_rng(5)
    n, e, k = 900, 16, 2
    logits = (rng.standard_normal((n, e)) * 2).astype(np.float16)
    ids, w = _topk(logits, k)
    docs = np.repeat(np.arange(9), 100)
    trace = write_trace(tmp_path / "t", {3: (ids, w, logits), 5: (ids, w, np.zeros_like(logits))},
                        rng.integers(0, 50, n), docs, num_experts=e, top_k=k)
    assert trace.num_shards > 1
    res = router_entropy(trace, keep_tokens=True, n_boot=200)
    router, _ = res.token_entropy[3]
    np.testing.assert_allclose(router, reference_entropy(reference_probabilities(logits, "softmax")), atol=2e-5)
    assert res.layer(5).mean_entropy_nats == pytest.approx(math.log(e), rel=1e-6)
    assert res.layer(5).mutual_information_nats == pytest.approx(0.0, abs=1e-6)
    assert res.layer(3).router.mean_nats.method == "bootstrap-documents" and res.layer(3).router.mean_nats.n_units == 9
    with pytest.raises(ValueError, match=r"layers \[4\]"):
        router_entropy(trace, [4])
    bare = write_trace(tmp_path / "bare", {3: (ids, w, None)}, rng.integers(0, 50, n), docs, num_experts=e, top_k=k)
    with pytest.raises(ValueError, match="--logits") as info:
        router_entropy(bare)
    assert "\n" not in str(info.value)


# The family's own mixing weights must follow from the trace's logits under that family's convention;
# this checks both that the logits are what the convention says (GPT-OSS: bias included) and the entropy.
FAMILY_CASES = {
    "olmoe": "softmax",
    "mixtral": "softmax",
    "qwen3_moe": "softmax",
    "deepseek_v3": "sigmoid",
    "gpt_oss": "softmax",
    "dbrx": "softmax",
}


def _weights_from_reference(family, logits, ids, cfg):
    x = logits.astype(np.float64)
    if family in ("mixtral", "gpt_oss"):            # softmax over the k selected logits
        sel = np.take_along_axis(x, ids, 1)
        e = np.exp(sel - sel.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    p = reference_probabilities(logits, FAMILY_CASES[family])
    sel = np.take_along_axis(p if family != "deepseek_v3" else 1 / (1 + np.exp(-x)), ids, 1)
    if family == "olmoe":
        return sel                                   # not renormalised
    if family in ("qwen3_moe", "dbrx"):
        return sel / sel.sum(1, keepdims=True)       # norm_topk_prob=True; DBRX's p-norm with p = 1
    return sel / sel.sum(1, keepdims=True) * cfg.routed_scaling_factor


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_family_conventions_on_generated_checkpoints(family, tmp_path):
    from lazarus_core.routing import capture_routing
    from lazarus_core.routing.corpus import corpus_from_prompts
    from tests.routing.tiny_models import tiny_model, tiny_tokenizer

    model, tok = tiny_model(family), tiny_tokenizer()
    texts = ["the water was long and people said no", "it is what it is", "one two three four five six",
             "people made this for their own time and the day"]
    capture_routing(model, tok, corpus_from_prompts(texts), tmp_path / "t", logits=True, seq_len=16, batch_size=2,
                    progress=False)
    trace = load_trace(tmp_path / "t")
    assert trace.meta["weight_convention"]["scoring"] == FAMILY_CASES[family]
    res = router_entropy(trace, keep_tokens=True, n_boot=100)
    assert res.scoring == FAMILY_CASES[family]
    for layer in trace.layers:
        lt = trace.layer(layer)
        logits = np.asarray(lt.logits)
        expected_w = _weights_from_reference(family, logits, np.asarray(lt.topk_ids, np.int64), model.config)
        np.testing.assert_allclose(lt.topk_weights, expected_w, atol=3e-3, rtol=3e-3)
        p = reference_probabilities(logits, FAMILY_CASES[family])
        router, topk = res.token_entropy[layer]
        np.testing.assert_allclose(router, reference_entropy(p), atol=1e-4)
        w = np.asarray(lt.topk_weights, np.float64)
        np.testing.assert_allclose(topk, reference_entropy(w / w.sum(1, keepdims=True)), atol=1e-5)
        entry = res.layer(layer)
        assert entry.max_entropy_nats == pytest.approx(math.log(trace.num_experts))
        assert 0 < entry.mean_entropy_nats < entry.marginal_entropy_nats <= entry.max_entropy_nats + 1e-6
        assert np.sum(entry.mean_probability) == pytest.approx(1.0, abs=1e-5)


def test_softmax_and_sigmoid_conventions_differ_on_the_same_logits():
    rng = np.random.default_rng(6)
    logits = (rng.standard_normal((200, 8)) * 3).astype(np.float16)
    soft, _ = entropy_from_logits(logits, scoring="softmax")
    sig, _ = entropy_from_logits(logits, scoring="sigmoid")
    assert np.mean(np.abs(soft - sig)) > 0.1          # a wrong convention would be caught
