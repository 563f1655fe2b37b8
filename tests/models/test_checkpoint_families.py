"""Every expert read through open_moe_checkpoint equals what transformers itself loads, for every family."""

import json

import pytest
import torch

from lazarus_core.models import PROJECTIONS, open_moe_checkpoint

pytest.importorskip("accelerate", reason="transformers needs accelerate to load MXFP4/FP8 checkpoints")

CASES = ["olmoe", "olmoe_fp32", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss",
         "gpt_oss_mxfp4", "deepseek_v3_fp8", "deepseek_v3_fp8_b16", "olmoe_sharded", "dbrx"]
EXPECTED_FORMAT = {"gpt_oss_mxfp4": "mxfp4", "deepseek_v3_fp8": "fp8_e4m3", "deepseek_v3_fp8_b16": "fp8_e4m3",
                   "olmoe_fp32": "fp32"}


def _hf_model(path):
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from lazarus_core.demo.load import from_pretrained_kwargs

    config = json.loads((Path(path) / "config.json").read_text())
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **from_pretrained_kwargs(config))


def _moe_blocks(model):
    """Layer index -> the MoE block (``mlp`` / ``ffn``) of every decoder layer (DBRX: ``transformer.blocks``)."""
    if hasattr(model, "transformer"):
        return {i: block.ffn for i, block in enumerate(model.transformer.blocks)}
    return {i: layer.mlp for i, layer in enumerate(model.model.layers)}


def _hf_router(block, family):
    return {"gpt_oss": lambda: block.router, "dbrx": lambda: block.router.layer}.get(family, lambda: block.gate)()


def _hf_expert(experts, family, projection, e, inter):
    """transformers' in-memory fused layout -> [out, in] (the known layout transforms of DESIGN section 4)."""
    if family == "dbrx":  # w1 (gate) / v1 (up) / w2 (down, transposed) [E*I, H]
        mlp = experts.mlp
        rows = {p: getattr(mlp, n).detach().view(-1, inter, mlp.hidden_size)[e] for p, n in
                (("gate", "w1"), ("up", "v1"), ("down", "w2"))}
        return rows[projection].t() if projection == "down" else rows[projection]
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    if family == "gpt_oss":  # gate_up [E, H, 2I] interleaved; down [E, I, H]
        return {"gate": gate_up[e][:, 0::2].t(), "up": gate_up[e][:, 1::2].t(), "down": down[e].t()}[projection]
    return {"gate": gate_up[e][:inter], "up": gate_up[e][inter:], "down": down[e]}[projection]


@pytest.mark.parametrize("name", CASES)
def test_every_expert_equals_transformers(name, checkpoint_dir):
    path = checkpoint_dir(name)
    model = _hf_model(path)
    with open_moe_checkpoint(path) as ckpt:
        spec = ckpt.spec
        assert ckpt.storage_format(spec.moe_layers[0]) == EXPECTED_FORMAT.get(name, "bf16")
        blocks = _moe_blocks(model)
        assert [i for i, block in blocks.items() if hasattr(block, "experts")] == list(spec.moe_layers)
        for layer in spec.moe_layers:
            mlp = blocks[layer]
            for projection in PROJECTIONS:
                seen = []
                for e, weight in ckpt.iter_experts(layer, projection):
                    seen.append(e)
                    assert weight.dtype == torch.float32 and weight.is_contiguous()
                    assert tuple(weight.shape) == ckpt.projection_shape(projection)
                    expected = _hf_expert(mlp.experts, spec.family, projection, e, spec.expert_intermediate_size)
                    torch.testing.assert_close(weight, expected, rtol=0, atol=0)
                assert seen == list(range(spec.num_experts))
            router = ckpt.router(layer)
            gate_module = _hf_router(mlp, spec.family)
            torch.testing.assert_close(router.weight, gate_module.weight.detach().float(), rtol=0, atol=0)
            if spec.routing.router_bias:
                torch.testing.assert_close(router.bias, gate_module.bias.detach().float(), rtol=0, atol=0)
            else:
                assert router.bias is None
            if spec.routing.selection_bias:
                assert router.selection_bias.abs().sum() > 0
                torch.testing.assert_close(router.selection_bias, gate_module.e_score_correction_bias.detach().float(),
                                           rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpt_oss", "gpt_oss_mxfp4"])
def test_gpt_oss_expert_biases_deinterleaved(name, checkpoint_dir):
    path = checkpoint_dir(name)
    experts = _hf_model(path).model.layers[1].mlp.experts
    with open_moe_checkpoint(path) as ckpt:
        torch.testing.assert_close(ckpt.expert_bias(1, "gate"), experts.gate_up_proj_bias.detach()[:, 0::2], rtol=0, atol=0)
        torch.testing.assert_close(ckpt.expert_bias(1, "up"), experts.gate_up_proj_bias.detach()[:, 1::2], rtol=0, atol=0)
        torch.testing.assert_close(ckpt.expert_bias(1, "down"), experts.down_proj_bias.detach(), rtol=0, atol=0)
        assert ckpt.expert_bias(1, "gate").shape == (ckpt.num_experts, ckpt.spec.expert_intermediate_size)


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v3_fp8_b16"])
def test_shared_experts_equal_transformers(name, checkpoint_dir):
    path = checkpoint_dir(name)
    model = _hf_model(path)
    with open_moe_checkpoint(path) as ckpt:
        shared = ckpt.spec.shared_experts
        for layer in ckpt.moe_layers:
            mlp = model.model.layers[layer].mlp
            module = getattr(mlp, shared.module)
            for projection in PROJECTIONS:
                expected = getattr(module, f"{projection}_proj").weight.detach()
                torch.testing.assert_close(ckpt.shared_expert_weight(layer, projection), expected, rtol=0, atol=0)
            gate = ckpt.shared_expert_gate(layer)
            if shared.gate_module:
                torch.testing.assert_close(gate, mlp.shared_expert_gate.weight.detach(), rtol=0, atol=0)
            else:
                assert gate is None


@pytest.mark.parametrize("name", ["olmoe", "mixtral", "qwen3_moe", "gpt_oss", "dbrx"])
def test_families_without_shared_experts_or_biases_say_none(name, checkpoint_dir):
    with open_moe_checkpoint(checkpoint_dir(name)) as ckpt:
        assert ckpt.shared_expert_weight(0, "gate") is None and ckpt.shared_expert_gate(0) is None
        if name != "gpt_oss":
            assert ckpt.expert_bias(0, "down") is None


def test_mxfp4_and_fp8_are_close_to_their_bf16_source(checkpoint_dir):
    # Same seed -> same bf16 weights; the quantised variants must be near them (quantisation error only).
    for quantised, source, tol in (("gpt_oss_mxfp4", "gpt_oss", 0.25), ("deepseek_v3_fp8_b16", "deepseek_v3", 0.07)):
        with open_moe_checkpoint(checkpoint_dir(quantised)) as q, open_moe_checkpoint(checkpoint_dir(source)) as s:
            layer = q.moe_layers[-1]
            for projection in PROJECTIONS:
                a, b = q.expert_weight(layer, projection, 1), s.expert_weight(layer, projection, 1)
                rel = (a - b).norm() / b.norm()
                assert 0 < rel < tol, (quantised, projection, rel)


def test_requested_dtype_and_to_dict(checkpoint_dir):
    for name in ("olmoe", "gpt_oss_mxfp4", "deepseek_v3_fp8"):
        with open_moe_checkpoint(checkpoint_dir(name)) as ckpt:
            layer = ckpt.moe_layers[0]
            w32 = ckpt.expert_weight(layer, "up", 0)
            for dtype in (torch.bfloat16, torch.float64):
                w = ckpt.expert_weight(layer, "up", 0, dtype=dtype)
                assert w.dtype == dtype
                torch.testing.assert_close(w, w32.to(dtype), rtol=0, atol=0)
            d = json.loads(json.dumps(ckpt.to_dict()))
            assert d["family"] == ckpt.family and d["projection_shapes"]["down"] == [64, 32]


def _silu_mlp(x, gate, up, down):
    return torch.nn.functional.silu(x @ gate.t()) * (x @ up.t()) @ down.t()


def _gpt_oss_mlp(x, gate, up, down, biases):
    g = (x @ gate.t() + biases[0]).clamp(max=7.0)
    u = (x @ up.t() + biases[1]).clamp(-7.0, 7.0)
    return (g * torch.sigmoid(1.702 * g) * (u + 1)) @ down.t() + biases[2]


@pytest.mark.parametrize("name", ["olmoe", "mixtral", "gpt_oss", "gpt_oss_mxfp4", "deepseek_v3_fp8_b16", "dbrx"])
def test_expert_forward_matches_transformers_experts_module(name, checkpoint_dir):
    # Orientation check independent of any layout assumption: route every token to expert e with
    # weight 1 through transformers' own experts module and compare with our [out, in] weights.
    path = checkpoint_dir(name)
    model = _hf_model(path)
    with open_moe_checkpoint(path) as ckpt, torch.no_grad():
        layer = ckpt.moe_layers[-1]
        experts = _moe_blocks(model)[layer].experts
        x = torch.randn(5, ckpt.spec.hidden_size)
        for e in (0, ckpt.num_experts - 1):
            w = {p: ckpt.expert_weight(layer, p, e) for p in PROJECTIONS}
            ids = torch.full((5, 1), e, dtype=torch.long)
            got = experts(x, ids, torch.ones(5, 1)).reshape(5, -1)  # DBRX returns [5, 1, H]
            if ckpt.spec.expert_bias:
                biases = [ckpt.expert_bias(layer, p)[e] for p in PROJECTIONS]
                expected = _gpt_oss_mlp(x, w["gate"], w["up"], w["down"], biases)
            else:
                expected = _silu_mlp(x, w["gate"], w["up"], w["down"])
            torch.testing.assert_close(got.float(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["olmoe", "gpt_oss", "gpt_oss_mxfp4", "deepseek_v3_fp8_b16", "dbrx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_reuse_and_out_give_the_same_weights(name, dtype, checkpoint_dir):
    with open_moe_checkpoint(checkpoint_dir(name)) as ckpt:
        layer = ckpt.moe_layers[-1]
        for projection in PROJECTIONS:
            buffers = set()
            for e, w in ckpt.iter_experts(layer, projection, dtype=dtype, reuse=True):
                buffers.add(w.data_ptr())
                fresh = ckpt.expert_weight(layer, projection, e, dtype=dtype)
                assert w.dtype == dtype and torch.equal(w, fresh), (projection, e)
            assert len(buffers) == 1
            out = torch.full(ckpt.projection_shape(projection), float("nan"), dtype=dtype)
            assert ckpt.expert_weight(layer, projection, 1, out=out) is out
            assert torch.equal(out, ckpt.expert_weight(layer, projection, 1, dtype=dtype))
        with pytest.raises(ValueError, match="out must be a contiguous CPU tensor of shape"):
            ckpt.expert_weight(layer, "down", 0, out=torch.empty(3, 3))
