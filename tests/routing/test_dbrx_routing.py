"""DBRX routing: the router returns only logits and DbrxFFN routes (softmax over E, top-k, weights over their
p-norm), so capture and interventions hook the router linear and the experts' inputs. Checked against
transformers' own DbrxRouter + route_tokens_to_experts and the hand-written block forward, for p = 1, 2, none."""

from __future__ import annotations

import pytest
import torch

from lazarus_core.routing.interventions import (
    RoutingEdit,
    RoutingIntervention,
    WeightOverride,
    ablate_experts,
    force_experts,
    set_top_k,
)
from lazarus_core.routing.locate import find_moe_layers
from lazarus_core.routing.recorder import RoutingRecorder, sort_by_weight
from tests.routing.reference import block_io as _block_io
from tests.routing.reference import hand_block_forward, record_routing
from tests.routing.tiny_models import tiny_model

NORMS = [1.0, 2.0, None]
_MODELS: dict = {}


def _model(p):
    if p not in _MODELS:
        _MODELS[p] = tiny_model("dbrx", seed=3, moe_normalize_expert_weights=p)
    return _MODELS[p]


def _transformers_routing(model, input_ids):
    """Per layer: (DbrxRouter's logits [T, E], transformers' own (weights, ids) from route_tokens_to_experts)."""
    seen, handles = {}, []
    for i, block in enumerate(model.transformer.blocks):
        def hook(module, args, output, i=i, ffn=block.ffn):
            weights, ids = ffn.route_tokens_to_experts(output)
            seen[i] = (output.detach().clone(), weights.detach().clone(), ids.detach().clone())
        handles.append(block.ffn.router.register_forward_hook(hook))
    return seen, record_routing(model, input_ids, handles)


@pytest.mark.parametrize("p", NORMS, ids=["p1", "p2", "none"])
def test_capture_equals_transformers_dbrx_routing(p):
    model = _model(p)
    info = find_moe_layers(model)
    assert info.family == "dbrx" and sorted(info.layers) == [0, 1] and info.top_k == 2 and info.num_experts == 8
    assert all(layer.routes_in_block for layer in info.layers.values())
    seen, routed = _transformers_routing(model, torch.randint(3, 96, (2, 7)))
    for layer, r in routed.items():
        logits, weights, ids = seen[layer]
        assert torch.equal(r.logits, logits.float())                 # raw router output, no softmax
        want_ids, want_w = sort_by_weight(ids, weights)
        assert torch.equal(r.topk_ids, want_ids)
        assert torch.equal(r.topk_weights, want_w)                   # what the experts really mixed with
        norms = torch.linalg.vector_norm(r.topk_weights, ord=p or 1.0, dim=-1)
        if p is None:
            assert (norms <= 1.0).all() and (norms < 0.99).any()    # plain softmax scores: not normalised
        else:
            torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("p", NORMS, ids=["p1", "p2", "none"])
def test_recomputed_convention_equals_transformers(p):
    from lazarus_core.routing.conventions import route

    model = _model(p)
    info = find_moe_layers(model)
    seen, _ = _transformers_routing(model, torch.randint(3, 96, (1, 9)))
    for layer, (logits, weights, ids) in seen.items():
        got_w, got_ids = route(logits, info.rule, info.top_k)
        want_ids, want_w = sort_by_weight(ids, weights)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("p", [2.0, None], ids=["p2", "none"])
@pytest.mark.parametrize("case", ["ablate", "force", "top_k"])
def test_interventions_follow_the_p_norm_convention(p, case):
    model = _model(p)
    make, kwargs, k = {
        "ablate": (lambda m: ablate_experts(m, [0, 3], [1]), dict(ablate=(0, 3)), 2),
        "force": (lambda m: force_experts(m, [7], [1]), dict(force=(7,)), 2),
        "top_k": (lambda m: set_top_k(m, 3, [1]), {}, 3),
    }[case]
    with make(model):
        h, out, routing = _block_io(model, 1, torch.randint(3, 96, (2, 6)))
    expected, routes = hand_block_forward(model.transformer.blocks[1].ffn, model.config, h, k, **kwargs)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert [sorted(r) for r in routing.topk_ids.tolist()] == [sorted(r) for r in routes]
    if p is not None:
        norms = torch.linalg.vector_norm(routing.topk_weights, ord=p, dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_weight_override_keeps_the_p_norm_and_the_model_is_restored():
    model = _model(2.0)
    ids = torch.randint(3, 96, (1, 6))
    _, before, plain = _block_io(model, 0, ids)
    top = int(plain.topk_ids[2, 0])
    edit = RoutingEdit(weights=(WeightOverride(top, 0.5, rows=(2,)),))
    with RoutingIntervention(model, edit, [0]):
        _, _, routing = _block_io(model, 0, ids)
    norms = torch.linalg.vector_norm(routing.topk_weights, ord=2.0, dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))        # ||w||_2 kept, the edited row included
    row = dict(zip(routing.topk_ids[2].tolist(), routing.topk_weights[2].tolist()))
    assert sorted(row) == sorted(plain.topk_ids[2].tolist())         # same experts, the weights re-sorted
    assert row[top] == pytest.approx(0.5)
    assert max(w for e, w in row.items() if e != top) == pytest.approx(0.75 ** 0.5)  # the other takes the rest
    assert torch.equal(routing.topk_weights[[0, 1, 3, 4, 5]], plain.topk_weights[[0, 1, 3, 4, 5]])
    _, after, again = _block_io(model, 0, ids)
    assert torch.equal(after, before) and torch.equal(again.topk_weights, plain.topk_weights)
    info = find_moe_layers(model)
    assert not any(h for l in info.layers.values() for h in (l.router._forward_hooks, l.experts._forward_pre_hooks))


def test_nested_interventions_and_generate_on_dbrx():
    model = _model(1.0)
    prompt = torch.tensor([[1, 5, 9]])
    with ablate_experts(model, [0, 1]), force_experts(model, [6], [0]), RoutingRecorder(model) as rec, \
            torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        steps = rec.pop()
    assert out.shape[1] == 7
    for layer, routing in steps.items():
        assert routing.topk_ids.shape[0] == 3 + 3
        assert not ((routing.topk_ids == 0) | (routing.topk_ids == 1)).any()
        if layer == 0:
            assert (routing.topk_ids == 6).any(dim=1).all()


def test_merged_experts_on_dbrx_average_the_fused_rows_and_route_with_the_pair_mass():
    from lazarus_core.analysis.expert_merging import MergedExperts

    model = _model(1.0)
    info = find_moe_layers(model)
    mlp = model.transformer.blocks[1].ffn.experts.mlp
    before = {n: getattr(mlp, n).detach().clone() for n in ("w1", "v1", "w2")}
    ids = torch.randint(3, 96, (2, 6))
    with MergedExperts(model, [(1, 0, 2)], {(1, 0): 3.0, (1, 2): 1.0}, info=info):
        h, _, routing = _block_io(model, 1, ids)
        for n, old in before.items():  # expert 0's rows 0:I of each [E*I, H] tensor; the rest untouched
            torch.testing.assert_close(getattr(mlp, n)[:48], 0.75 * old[:48] + 0.25 * old[96:144])
            assert torch.equal(getattr(mlp, n)[48:], old[48:])
    assert not (routing.topk_ids == 2).any()
    p = torch.softmax(h.double() @ info.layers[1].router.weight.detach().double().T, -1)
    p[:, 0] += p[:, 2]
    p[:, 2] = 0.0
    top = p.topk(2, dim=-1)
    expected = top.values / top.values.sum(-1, keepdim=True)        # the merged pair's mass, then DBRX's 1-norm
    assert [sorted(r) for r in routing.topk_ids.tolist()] == [sorted(r) for r in top.indices.tolist()]
    torch.testing.assert_close(routing.topk_weights.double(), expected, rtol=1e-5, atol=1e-6)
    for n, old in before.items():
        assert torch.equal(getattr(mlp, n), old)                     # restored


def test_routing_manipulation_probe_reads_dbrx_routing():
    from lazarus_core.analysis.routing_manipulation import _Probe

    model = _model(1.0)
    info = find_moe_layers(model)
    ids = torch.randint(3, 96, (3, 5))
    probe = _Probe(model, 1, info)
    with torch.no_grad():
        logits, primary = probe.route_at(probe.embed(ids), target=4)
    routed = record_routing(model, ids)[1]
    last = torch.arange(3) * 5 + 4                                   # position 4 of each sequence
    torch.testing.assert_close(logits, routed.logits[last])
    assert torch.equal(primary, routed.topk_ids[last, 0])
    assert not info.layers[1].router._forward_hooks and not info.layers[1].experts._forward_pre_hooks


def test_expert_merging_analysis_runs_on_dbrx(tmp_path):
    from lazarus_core.analysis.expert_merging import expert_merging, expert_parameters
    from lazarus_core.routing.capture import capture_routing
    from lazarus_core.routing.corpus import corpus_from_prompts
    from lazarus_core.routing.trace_reader import load_trace
    from tests.routing.tiny_models import tiny_tokenizer

    model = _model(1.0)
    mlp = model.transformer.blocks[0].ffn.experts.mlp
    flat = expert_parameters(model.transformer.blocks[0].ffn.experts, 8)
    assert flat.shape == (8, 3 * 48 * 32)                            # w1, v1, w2 rows of each expert
    assert torch.equal(flat[5, : 48 * 32], mlp.w1.detach()[5 * 48:6 * 48].double().flatten())
    texts = ["the water was long and people said no", "it is what it is", "one two three four five six"]
    capture_routing(model, tiny_tokenizer(), corpus_from_prompts(texts), tmp_path / "t", logits=True, seq_len=16,
                    progress=False)
    res = expert_merging(model, load_trace(tmp_path / "t"), None, threshold=0.8, null_draws=4)
    assert res.bytes_per_expert == {0: 3 * 48 * 32 * 4, 1: 3 * 48 * 32 * 4}   # fp32 rows of one expert
    assert res.mergeable_share == 0.0 and not res.pareto               # random experts: nothing to merge


def test_capture_runs_dbrx_without_its_lm_head():
    from lazarus_core.routing.capture import decoder_of

    model = _model(1.0)
    assert decoder_of(model) is model.transformer                    # DbrxForCausalLM keeps its decoder there
