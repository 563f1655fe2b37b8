"""Interventions (ablate, boost/suppress, force, top-k) against a hand-computed MoE-block forward, every family."""

from __future__ import annotations

import pytest
import torch

from lazarus_core.routing.interventions import (
    RoutingEdit,
    RoutingIntervention,
    ablate_experts,
    boost_expert,
    force_experts,
    set_top_k,
    suppress_expert,
)
from lazarus_core.routing.locate import find_moe_layers
from lazarus_core.routing.recorder import RoutingRecorder
from tests.routing.reference import block_io as _block_io
from tests.routing.reference import hand_block_forward
from tests.routing.tiny_models import FAMILIES, tiny_model

_MODELS: dict[str, torch.nn.Module] = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def _cases(info, layer):
    E, k = info.num_experts, info.top_k
    return {
        "ablate": (lambda m: ablate_experts(m, [0, 2], [layer]), dict(ablate=(0, 2)), k),
        "boost": (lambda m: boost_expert(m, 1, 3.0, [layer]), dict(delta=torch.eye(E)[1] * 3.0), k),
        "suppress": (lambda m: suppress_expert(m, 3, 2.0, [layer]), dict(delta=-torch.eye(E)[3] * 2.0), k),
        "force": (lambda m: force_experts(m, [E - 1], [layer]), dict(force=(E - 1,)), k),
        "top_k_up": (lambda m: set_top_k(m, k + 1, [layer]), {}, k + 1),
        "top_k_down": (lambda m: set_top_k(m, max(1, k - 1), [layer]), {}, max(1, k - 1)),
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["none", "ablate", "boost", "suppress", "force", "top_k_up", "top_k_down"])
def test_intervention_matches_hand_forward(family, case):
    model = _model(family)
    info = find_moe_layers(model)
    layer = min(info.layers)
    input_ids = torch.randint(3, 96, (2, 6))
    if case == "none":
        h, out, routing = _block_io(model, layer, input_ids)
        kwargs, k = {}, info.top_k
    else:
        make, kwargs, k = _cases(info, layer)[case]
        with make(model):
            h, out, routing = _block_io(model, layer, input_ids)
    expected, routes = hand_block_forward(info.layers[layer].block, model.config, h, k, **kwargs)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert routing.topk_ids.shape == (h.shape[0], k)
    assert [sorted(r) for r in routing.topk_ids.tolist()] == [sorted(r) for r in routes]
    if case == "ablate":
        assert not set(routing.topk_ids.flatten().tolist()) & {0, 2}
    if case == "force":
        assert (routing.topk_ids == info.num_experts - 1).any(dim=1).all()


def test_olmoe_ablation_keeps_weights_unnormalised():
    """OLMoE: softmax over the remaining experts, top-k, and NO renormalisation of the k weights."""
    model = _model("olmoe")
    info = find_moe_layers(model)
    with ablate_experts(model, [1], [0]):
        _, _, routing = _block_io(model, 0, torch.randint(3, 96, (1, 8)))
    sums = routing.topk_weights.sum(dim=1)
    assert (sums < 0.999).all(), "OLMoE top-k weights must not be renormalised"
    assert not (routing.topk_ids == 1).any()


def test_deepseek_v3_weights_sum_to_scaling_factor():
    """DeepSeek-V3: sigmoid scores, normalised over the k, times routed_scaling_factor (2.5 here)."""
    model = _model("deepseek_v3")
    with set_top_k(model, 4, [1]):
        _, _, routing = _block_io(model, 1, torch.randint(3, 96, (1, 8)))
    torch.testing.assert_close(routing.topk_weights.sum(dim=1), torch.full((8,), 2.5), rtol=1e-5, atol=1e-5)


def test_nested_interventions_combine_and_restore():
    model = _model("qwen3_moe")
    ids = torch.randint(3, 96, (1, 8))
    _, before, _ = _block_io(model, 0, ids)
    with ablate_experts(model, [0], [0]), RoutingIntervention(model, RoutingEdit(force=(5,)), [0]):
        h, out, routing = _block_io(model, 0, ids)
    expected, _ = hand_block_forward(find_moe_layers(model).layers[0].block, model.config, h, 2, ablate=(0,), force=(5,))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert (routing.topk_ids == 5).any(dim=1).all() and not (routing.topk_ids == 0).any()
    _, after, _ = _block_io(model, 0, ids)
    torch.testing.assert_close(after, before)
    assert not hasattr(find_moe_layers(model).layers[0].router, "_lazarus_routing_interventions")


def test_intervention_during_generate():
    model = _model("olmoe")
    with ablate_experts(model, [0, 1]), RoutingRecorder(model) as rec, torch.no_grad():
        out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        steps = rec.pop()
    assert out.shape[1] == 7
    for routing in steps.values():
        assert routing.topk_ids.shape[0] == 3 + 3  # prompt rows, then one row per new token (the last is not run)
        assert not ((routing.topk_ids == 0) | (routing.topk_ids == 1)).any()


@pytest.mark.parametrize("bad", [
    lambda m: ablate_experts(m, [99]),
    lambda m: set_top_k(m, 0),
    lambda m: force_experts(m, [0], [7]),
])
def test_bad_intervention_arguments(bad):
    with pytest.raises(ValueError, match="expert 99|top_k=0|not MoE layers"):
        bad(_model("mixtral"))


def test_force_and_ablate_same_expert_is_an_error():
    model = _model("mixtral")
    with ablate_experts(model, [1]), force_experts(model, [1]):
        with pytest.raises(ValueError, match="both forced and excluded"), torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))


def test_intervention_touches_only_the_chosen_layers():
    model = _model("gpt_oss")
    ids = torch.randint(3, 96, (1, 8))
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(ids)
        before = rec.pop()
        with ablate_experts(model, [int(before[1].topk_ids[0, 0])], [1]):
            model(ids)
            after = rec.pop()
    assert torch.equal(after[0].topk_ids, before[0].topk_ids)
    assert not torch.equal(after[1].topk_ids, before[1].topk_ids)
