"""expert-interference on constructed models: a zero-output k-th expert costs exactly 0, the no-op gives 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lazarus_core.analysis.expert_interference import (
    default_k_values,
    expert_interference,
    frequent_pairs,
    pair_compatibility,
    topk_sweep,
    trace_windows,
)
from tests.routing.tiny_models import tiny_model, tiny_tokenizer

J = 0                     # the residual coordinate held at +1 in every layer
RANK = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])   # router logit per unit of that coordinate


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def ranked_model(zero_expert: int | None = 2):
    """OLMoE (8 experts, k = 3) whose every router ranks experts 0 > 1 > 2 > ... at every token.

    Coordinate J of the residual stream is +1 for every token (embedding column J = 1, nothing writes to
    it), so its normalised value is positive and a router reading only J ranks experts by ``RANK``.
    ``zero_expert`` gets a zero output (down projection 0).
    """
    model = tiny_model("olmoe", seed=1)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, J] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[J, :] = 0.0
            layer.mlp.experts.down_proj[:, J, :] = 0.0
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[:, J] = RANK
            if zero_expert is not None:
                layer.mlp.experts.down_proj[zero_expert] = 0.0
    return model.eval()


def _docs(seed: int = 0, n: int = 6, length: int = 12) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(4, 96, size=length - 1).tolist() for _ in range(n)]


def test_zero_output_kth_expert_costs_exactly_nothing():
    model = ranked_model(zero_expert=2)
    rows, _, _, _, tokens, docs = topk_sweep(model, _docs(), per_layer=True, n_boot=200)
    by = {(r.scope, r.k): r for r in rows}
    assert tokens == 6 * 11 and docs == 6
    for scope in ("all", "layer 0", "layer 1"):
        # k = 2 vs k = 3: the third expert (always expert 2) adds exactly zero
        step = by[(scope, 2)].step_delta_nll
        assert step.estimate == 0.0 and step.low == 0.0 and step.high == 0.0
        assert by[(scope, 2)].top1_agreement.estimate == 1.0
        # k = 1 vs k = 2: expert 1 has an output, so dropping it changes the loss
        assert by[(scope, 1)].step_delta_nll.estimate != 0.0
        assert by[(scope, 1)].kl.estimate > 0.0


def test_noop_k_equals_model_k_is_zero_with_a_ci_containing_zero():
    model = tiny_model("qwen3_moe", seed=3)
    rows, *_ = topk_sweep(model, _docs(1), k_values=[1], per_layer=False, n_boot=200)
    noop = next(r for r in rows if r.k == 2)            # the model's own k
    assert abs(noop.delta_nll.estimate) < 1e-6
    assert noop.delta_nll.includes_zero
    assert noop.kl.estimate < 1e-8 and noop.top1_agreement.estimate == 1.0
    assert noop.step_delta_nll is None
    one = next(r for r in rows if r.k == 1)
    assert one.kl.estimate > 1e-4                       # k = 1 is a real change


def _capture(model, tmp_path, texts):
    from lazarus_core.routing import capture_routing, load_trace

    capture_routing(model, tiny_tokenizer(), texts, tmp_path / "t", seq_len=64, progress=False)
    return load_trace(tmp_path / "t")


TEXTS = ["the a of and to in is it that was he for on are as with his they at be this",
         "from have or by one had not but what all were when we there can an your which",
         "their said if do will each about how up out them then she many some so these would",
         "other into has more her two like him see time could no make than first been its who"]


def test_trace_windows_map_rows_to_tokens(tmp_path):
    model = ranked_model()
    trace = _capture(model, tmp_path, TEXTS)
    windows = trace_windows(trace, max_documents=3)
    assert [w.doc for w in windows] == [0, 1, 2]
    for w in windows:
        assert np.array_equal(np.asarray(trace.token_ids)[w.rows], w.ids)


def test_pair_compatibility_zero_output_partner_costs_exactly_zero(tmp_path):
    model = ranked_model(zero_expert=2)
    trace = _capture(model, tmp_path, TEXTS)
    windows = trace_windows(trace)
    tokens = sum(len(w.ids) for w in windows)
    # every token selects experts 0, 1, 2: all three pairs are co-selected at every token
    top = frequent_pairs(np.asarray(trace.layer(0).topk_ids), 8, 3)
    assert sorted((a, b) for a, b, _, _ in top) == [(0, 1), (0, 2), (1, 2)]
    assert all(c == tokens for _, _, c, _ in top)
    rows = {tuple(p.experts): p for p in pair_compatibility(model, trace, 0, windows, pairs=3, n_boot=200)}
    # (1, 2): the lower-weighted is expert 2, whose output is zero -> exactly no change;
    # its random replacement is the other selected expert, 0, which matters
    p = rows[(1, 2)]
    assert p.delta_nll.estimate == 0.0 and p.delta_nll.low == 0.0 and p.delta_nll.high == 0.0
    assert p.random_delta_nll.estimate != 0.0
    assert p.control == "other-selected-expert"
    # (0, 1): forcing expert 1 out changes the loss
    assert rows[(0, 1)].delta_nll.estimate != 0.0


def test_report_and_json(tmp_path):
    import json

    model = ranked_model()
    trace = _capture(model, tmp_path, TEXTS)
    res = expert_interference(model, trace_windows(trace), trace=trace, pairs=1, per_layer=False, n_boot=100, top=2)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["top_k"] == 3 and [r["k"] for r in d["topk"]] == [1, 2, 3]
    assert len(d["pairs"]) == 2 and d["degraded_positions"]
    assert len(res.degraded_positions) == 2 * 2         # top 2 at each k < K
    assert res.degraded_positions[0].delta_nll >= res.degraded_positions[1].delta_nll
    assert set(res.tables()) == {"topk", "pairs", "degraded_documents", "degraded_positions"}


def test_k_values_and_errors():
    assert default_k_values(2) == [1, 2]
    assert default_k_values(20) == [1, 2, 4, 8, 16, 19, 20]
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="k-values"):
        topk_sweep(model, _docs(), k_values=[5])
    with pytest.raises(ValueError, match="two tokens"):
        topk_sweep(model, [[1]])
