"""Steering one expert's post-softmax weight: the override rule on planted tensors, the block it feeds, and steer()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lazarus_core.analysis.steering import steer
from lazarus_core.routing.interventions import RoutingEdit, RoutingIntervention, WeightOverride, override_weight
from lazarus_core.routing.locate import find_moe_layers
from lazarus_core.routing.recorder import RoutingRecorder
from tests.routing.reference import expert_forward
from tests.routing.tiny_models import tiny_model

_MODELS: dict[str, torch.nn.Module] = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def _rule(family):
    return find_moe_layers(_model(family)).rule


W = torch.tensor([[0.5, 0.2], [0.3, 0.1]])
IDS = torch.tensor([[1, 2], [3, 1]])


def test_override_keeps_other_weights_in_olmoe():
    w, ids = override_weight(W, IDS, WeightOverride(1, 0.4), _rule("olmoe"))
    assert ids.tolist() == IDS.tolist()
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.2], [0.3, 0.4]]))


def test_override_shares_the_rest_in_a_renormalising_family():
    # Mixtral: softmax over the k, so the total (here 0.7 and 0.4) is kept and the others share what is left.
    w, _ = override_weight(W, IDS, WeightOverride(1, 0.4), _rule("mixtral"))
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3], [0.0, 0.4]]))
    w, _ = override_weight(W, IDS, WeightOverride(1, 0.0), _rule("mixtral"))     # ablation: others get it all
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.7], [0.4, 0.0]]))


def test_override_of_an_unselected_expert_adds_a_slot_only_where_asked():
    w, ids = override_weight(W, IDS, WeightOverride(5, 0.25, rows=(1,)), _rule("olmoe"))
    assert ids.shape == (2, 3) and ids[1, 2] == 5 and ids[0, 2] != 5
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.2, 0.0], [0.3, 0.1, 0.25]]))
    w, ids = override_weight(W, IDS, WeightOverride(5, 0.0), _rule("olmoe"))     # zero weight: nothing added
    assert ids.shape == (2, 2) and torch.equal(w, W)


def test_additive_override():
    # row 0 holds expert 2 (0.2 -> 0.3); row 1 does not, so it gets a new slot with 0 + 0.1
    w, ids = override_weight(W, IDS, WeightOverride(2, 0.1, add=True), _rule("olmoe"))
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.3, 0.0], [0.3, 0.1, 0.1]]))
    assert ids[1].tolist() == [3, 1, 2]


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss", "qwen3_moe", "dbrx"])
def test_block_mixes_with_the_overridden_weight(family):
    """The experts module receives the edited routing and its output is the hand-weighted sum of expert outputs."""
    model = _model(family)
    info = find_moe_layers(model)
    layer = max(info.layers)
    block = info.layers[layer].block
    seen = {}
    h1 = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach()))
    h2 = block.register_forward_hook(lambda m, a, o: seen.__setitem__("out", (o[0] if isinstance(o, tuple) else o).detach()))
    edit = RoutingEdit(weights=(WeightOverride(1, 0.6, rows=(2, 4)),))
    try:
        with RoutingIntervention(model, edit, [layer]), RoutingRecorder(model, [layer]) as rec, torch.no_grad():
            model(torch.tensor([[1, 5, 9, 12, 30, 7]]))
            routing = rec.pop()[layer]
    finally:
        h1.remove()
        h2.remove()
    h = seen["in"].reshape(-1, seen["in"].shape[-1]).double()
    w1 = (routing.topk_weights * (routing.topk_ids == 1)).sum(1)
    assert w1[2].item() == pytest.approx(0.6) and w1[4].item() == pytest.approx(0.6)
    expected = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for e, w in zip(routing.topk_ids[t].tolist(), routing.topk_weights[t].tolist()):
            if w:
                expected[t] += w * expert_forward(block, e, h[t: t + 1])[0]
    out = seen["out"].reshape(h.shape).double()
    if hasattr(block, "shared_experts") or hasattr(block, "shared_expert"):
        pytest.skip("shared experts add a term the hand sum leaves out")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


IDS_PROMPT = [1, 5, 9, 12, 30, 7]


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_setting_the_current_weight_changes_nothing(family):
    model = _model(family)
    info = find_moe_layers(model)
    layer = min(info.layers)
    first = steer(model, IDS_PROMPT, layer, 1, mode="boost", value=0.5, target_idx=3, baseline_experts=0,
                  max_new_tokens=2)
    same = steer(model, IDS_PROMPT, layer, 1, mode="boost", value=first.weight_before[0], target_idx=3,
                 baseline_experts=0, max_new_tokens=2)
    assert same.kl == 0.0 and not same.top1_changed
    assert same.continuation_after_ids == same.continuation_before_ids


def test_an_edit_before_the_last_position_of_the_last_layer_cannot_reach_the_next_token():
    """Causality: at the last decoder layer, position 0's MoE output never reaches the last position's logits."""
    model = _model("olmoe")
    layer = max(find_moe_layers(model).layers)
    res = steer(model, IDS_PROMPT, layer, 2, mode="boost", value=1.0, target_idx=0, baseline_experts=2,
                max_new_tokens=1)
    # (other experts: a changed expert set at row 0 regroups the batched expert matmuls, float noise only)
    assert res.kl < 1e-12 and res.kl_other_experts < 1e-12
    res = steer(model, IDS_PROMPT, layer, 2, mode="boost", value=1.0, target_idx=-1, baseline_experts=2,
                max_new_tokens=1)
    assert res.target_idx == len(IDS_PROMPT) - 1 and res.kl > 1e-9


def test_boost_moves_the_distribution_and_the_sweep_agrees_with_single_runs():
    model = _model("mixtral")
    layer = min(find_moe_layers(model).layers)
    res = steer(model, IDS_PROMPT, layer, 0, mode="boost", value=1.0, sweep=[0.0, 1.0], baseline_experts=2,
                max_new_tokens=3)
    # a random tiny model predicts nearly uniformly, so KLs are small; float noise is ~1e-17
    assert res.kl > 1e-9 and res.renormalised and len(res.other_experts) == 2
    assert res.sweep[1].kl == pytest.approx(res.kl, rel=1e-9, abs=1e-12)
    ablated = steer(model, IDS_PROMPT, layer, 0, mode="ablate", baseline_experts=0, max_new_tokens=1)
    assert ablated.value == 0.0 and res.sweep[0].kl == pytest.approx(ablated.kl, rel=1e-9, abs=1e-12)
    probs = [t.prob for t in res.top_before]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    d = res.to_dict()
    assert {"kl", "kl_other_experts", "top_before", "top_after", "continuation_before", "continuation_after",
            "sweep", "weight_before", "renormalised"} <= set(d)
    assert np.isfinite(d["sweep"][0]["kl"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(layer=0, expert=99), "--expert 99 is out of range"),
    (dict(layer=7, expert=0), "--layer 7"),
    (dict(layer=0, expert=0, target_idx=6), "--target-idx 6 is out of range"),
    (dict(layer=0, expert=0, value=-1.0), "--value"),
    (dict(layer=0, expert=0, mode="amplify"), "--mode"),
])
def test_bad_steering_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        steer(_model("olmoe"), IDS_PROMPT, **kwargs)
