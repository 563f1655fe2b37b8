"""load_model: a transformers model whose experts run the fused overlay forward (never the full weights),
matching the original model on the reconstructed experts; generate works; the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lazarus_core.cli.main import main
from lazarus_core.models import open_moe_checkpoint
from lazarus_core.models.builtin import resolve_builtin
from lazarus_core.overlay import load_model, make_policy, plan_overlay, write_overlay
from lazarus_core.overlay.load import IMPLEMENTATION, experts_modules, load_overlay_layers
from lazarus_core.routing.loading import load_model as load_original


def _compress(src: str, out, rank: int, dtype: str = "fp32"):
    ckpt = open_moe_checkpoint(src)
    write_overlay(ckpt, out, plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=rank), dtype=dtype), model=src)
    return ckpt


@pytest.mark.parametrize("name", ["olmoe", "gpt_oss_mxfp4", "mixtral", "deepseek_v3"])
def test_full_rank_overlay_model_matches_original(checkpoint_dir, tmp_path, name):
    src = str(checkpoint_dir(name))
    _compress(src, tmp_path / "ov", rank=64)  # >= min(H, I): exact up to fp32 rounding
    original, _, _ = load_original(src)
    model = load_model(overlay=tmp_path / "ov", backend="cpu")
    assert model.config._experts_implementation == IMPLEMENTATION
    for module in experts_modules(model).values():  # no full expert weights anywhere
        assert module._parameters.get("gate_up_proj") is None and module._parameters.get("down_proj") is None
    ids = torch.randint(0, original.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected, got = original(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    out = model.generate(ids[:1, :5], **kw)
    assert out.shape == (1, 9) and torch.equal(out, original.generate(ids[:1, :5], **kw))


def test_fp8_overlay_model_matches_original(checkpoint_dir, tmp_path):
    # DeepSeek-V3 FP8 end to end, with 16x16 scale blocks and a 24-row q_a_proj (a partial edge block).
    src = str(checkpoint_dir("deepseek_v3_fp8_b16"))
    ckpt = _compress(src, tmp_path / "ov", rank=64)
    original, _, _ = load_original(src)
    q_a = original.model.layers[0].self_attn.q_a_proj.weight
    assert q_a.shape[0] % 16 and q_a.dtype == torch.float32
    torch.testing.assert_close(q_a, _exact_fp8(src, "model.layers.0.self_attn.q_a_proj.weight"), rtol=0, atol=0)
    for layer, module in experts_modules(original).items():  # transformers' decode of the experts is exact too
        torch.testing.assert_close(module.down_proj[1], ckpt.expert_weight(layer, "down", 1), rtol=0, atol=0)
    model = load_model(overlay=tmp_path / "ov", backend="cpu")
    ids = torch.randint(0, original.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=2e-5, rtol=1e-4)


def _exact_fp8(root: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    from lazarus_core.ops import fp8_dequant_reference

    with safe_open(f"{root}/model.safetensors", "pt") as f:
        return fp8_dequant_reference(f.get_tensor(name).view(torch.uint8), f.get_tensor(name + "_scale_inv").float(),
                                     block_size=(16, 16))


def test_low_rank_overlay_changes_outputs_and_mismatch_is_refused(checkpoint_dir, tmp_path):
    src = str(checkpoint_dir("olmoe"))
    _compress(src, tmp_path / "ov", rank=1)
    original, _, _ = load_original(src)
    model = load_model(src, overlay=tmp_path / "ov")
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert not torch.allclose(original(ids).logits, model(ids).logits, atol=1e-4)  # the test can fail
    with pytest.raises(ValueError, match="made from a olmoe"):
        load_model(str(checkpoint_dir("mixtral")), overlay=tmp_path / "ov")


def test_cli_estimate_compute_compress_verify(checkpoint_dir, tmp_path, capsys):
    src = str(checkpoint_dir("gpt_oss_mxfp4"))
    run = lambda *a: main(["introspect", "moe-expert", *a, "--no-progress"])  # noqa: E731
    assert run("moe-overlay-estimate", "-m", src, "--rank", "4", "-o", str(tmp_path / "e.json")) == 0
    est = json.loads((tmp_path / "e.json").read_text())
    assert est["bytes"]["source_storage"] == "mxfp4" and "4.25" in est["bytes"]["formula"]
    assert run("moe-overlay-compute", "-m", src, "--energy", "0.9", "--layers", "1", "-o", str(tmp_path / "c.json")) == 0
    comp = json.loads((tmp_path / "c.json").read_text())
    assert comp["layers"] == [1] and len(comp["projections"]) == 3
    assert any("does not pay" in n for n in comp["notes"])  # random experts: an honest "no"
    assert run("moe-overlay-compress", "-m", src, "--gate-rank", "2", "--up-rank", "3", "--down-rank", "1",
               "--out", str(tmp_path / "ov"), "-o", str(tmp_path / "p.json")) == 0
    press = json.loads((tmp_path / "p.json").read_text())
    assert {p["projection"]: p["rank"] for p in press["projections"]} == {"gate": 2, "up": 3, "down": 1}
    assert set(press["presets"]) == {"fast", "balanced", "quality"}
    assert run("moe-overlay-verify", "-m", src, "--overlay", str(tmp_path / "ov"), "--weights-only",
               "-o", str(tmp_path / "v.json")) == 0
    ver = json.loads((tmp_path / "v.json").read_text())
    assert len(ver["reconstruction"]) == 6 and ver["verdict"] is None
    assert run("moe-overlay-compute", "-m", src, "--rank", "2", "--energy", "0.9") == 2
    assert "choose one of" in capsys.readouterr().err


def _compress_builtin(alias: str, tmp_path) -> dict:
    """``moe-overlay-compress -m alias --energy 0.99 --out tmp_path/ov``; returns its JSON report."""
    assert main(["introspect", "moe-expert", "moe-overlay-compress", "-m", alias, "--energy", "0.99",
                 "--out", str(tmp_path / "ov"), "--no-progress", "-o", str(tmp_path / "p.json")]) == 0
    return json.loads((tmp_path / "p.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(resolve_builtin("demo:native") is None, reason="demo:native is not installed")
def test_verify_and_generate_on_builtin_native(tmp_path):
    plan = _compress_builtin("demo:native", tmp_path)
    assert plan["bytes"]["expert_ratio"] < 1.0 and plan["notes"]  # native MoE: the overlay does not pay
    code = main(["introspect", "moe-expert", "moe-overlay-verify", "-m", "demo:native", "--overlay",
                 str(tmp_path / "ov"), "--max-tokens", "256", "-o", str(tmp_path / "v.json")])
    ver = json.loads((tmp_path / "v.json").read_text())
    assert code == (0 if ver["verdict"] == "PASS" else 1) and ver["tokens"] > 200
    assert ver["top1_agreement"] > 0.9 and set(ver["block_output_error"]) == {"0", "1", "2", "3"}
    lo, hi = ver["top1_agreement_ci95"]
    assert lo < ver["top1_agreement"] < hi or ver["top1_agreement"] == hi == 1.0
    assert main(["generate", "-m", "demo:native", "--overlay", str(tmp_path / "ov"), "-p", "A cat is",
                 "--max-new-tokens", "4", "-o", str(tmp_path / "g.json")]) == 0
    gen = json.loads((tmp_path / "g.json").read_text())
    assert gen["new_tokens"] == 4 and gen["tokens_per_second"] > 0


@pytest.mark.slow
@pytest.mark.skipif(resolve_builtin("demo:upcycled") is None, reason="demo:upcycled is not installed")
def test_builtin_upcycled_meets_the_acceptance_bar(tmp_path):
    # issue 9's bar: at --energy 0.99, experts >= 4x smaller than the MXFP4 file, and on the whole held-out split
    # perplexity within 1% of the original and top-1 agreement >= 99%
    plan = _compress_builtin("demo:upcycled", tmp_path)
    assert plan["bytes"]["source_storage"] == "mxfp4" and plan["bytes"]["expert_ratio"] >= 4.0
    code = main(["introspect", "moe-expert", "moe-overlay-verify", "-m", "demo:upcycled", "--overlay",
                 str(tmp_path / "ov"), "--max-tokens", "1000000", "-o", str(tmp_path / "v.json")])
    ver = json.loads((tmp_path / "v.json").read_text())
    assert ver["tokens"] > 40_000  # every token of the shipped held-out split
    assert abs(ver["perplexity_increase"]) <= 0.01
    assert ver["top1_agreement"] >= 0.99 and ver["verdict"] == "PASS" and code == 0
    assert ver["top1_agreement_ci95"][0] >= 0.99  # the whole 95% interval clears the bar


def _reconstructed(original: torch.nn.Module, overlay) -> torch.nn.Module:
    """``original`` with every experts module's weights set to the overlay's ``base + A @ B`` (and biases), as
    ordinary transformers expert parameters in the family's layout."""
    model_type = original.config.model_type
    for layer, ex in load_overlay_layers(overlay).items():
        module = experts_modules(original)[layer]
        gate, up, down = (ex.reconstruct(p) for p in ("gate", "up", "down"))  # [E, out, in] fp32
        if model_type == "dbrx":  # mlp.w1 (gate), v1 (up), w2 (down transposed per expert), each [E*I, H]
            for pname, w in (("w1", gate), ("v1", up), ("w2", down.transpose(1, 2))):
                module.mlp._parameters[pname].data.copy_(w.reshape(-1, w.shape[-1]))
            continue
        if model_type == "gpt_oss":  # gate_up_proj [E, H, 2I], gate/up interleaved on the last axis; down_proj [E, I, H]
            gate_up = torch.stack([gate, up], 2).flatten(1, 2).transpose(1, 2)  # rows g0 u0 g1 u1 ..., then [E, H, 2I]
            bias = torch.stack([ex.bias_gate, ex.bias_up], -1).flatten(-2)
            module.gate_up_proj_bias.data.copy_(bias)
            module.down_proj_bias.data.copy_(ex.bias_down)
            down = down.transpose(1, 2)
        else:  # gate_up_proj [E, 2I, H] (gate rows above up rows), down_proj [E, H, I]
            gate_up = torch.cat([gate, up], 1)
        module.gate_up_proj.data.copy_(gate_up)
        module.down_proj.data.copy_(down)
    return original


@pytest.mark.parametrize("name", ["olmoe", "gpt_oss_mxfp4", "dbrx"])
def test_model_backpropagates_like_reconstructed_weights(checkpoint_dir, tmp_path, name):
    # Outside no_grad: gradients w.r.t. the input embeddings (through attention, routers, routing weights and
    # experts of every layer) match the same model with the reconstructed expert weights.
    src = str(checkpoint_dir(name))
    _compress(src, tmp_path / "ov", rank=2)  # low rank: the overlay differs from the source
    model = load_model(overlay=tmp_path / "ov", backend="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    reference = _reconstructed(load_original(src)[0], tmp_path / "ov")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    emb = model.get_input_embeddings()(ids).detach()
    probe = torch.randn(2, 9, model.config.vocab_size)
    grads = []
    for m in (model, reference):
        e = emb.clone().requires_grad_()
        logits = m(inputs_embeds=e).logits
        (logits * probe).sum().backward()
        grads.append((logits.detach(), e.grad))
    (logits, grad), (ref_logits, ref_grad) = grads
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(grad, ref_grad, atol=1e-5 * float(ref_grad.abs().max()), rtol=1e-4)


def test_torch_compile_traces_the_experts_without_graph_breaks(checkpoint_dir, tmp_path):
    src = str(checkpoint_dir("gpt_oss_mxfp4"))  # biases, clamped activation; bf16 factors as stored
    _compress(src, tmp_path / "ov", rank=2, dtype="bf16")
    model = load_model(overlay=tmp_path / "ov", backend="cpu")
    hidden = model.config.hidden_size
    # the MoE block (router, top-k, experts call) in one graph; the whole model traces with no break too, but
    # tracing attention and masks takes most of a minute on the 2-core CI machine
    explanation = torch._dynamo.explain(model.model.layers[0].mlp)(torch.randn(1, 6, hidden))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    experts = experts_modules(model)[0]
    x, gy = torch.randn(5, hidden), torch.randn(5, hidden)
    ids = torch.stack([torch.randperm(model.config.num_local_experts)[:2] for _ in range(5)])
    w = torch.rand(5, 2)
    outputs = []
    for module in (experts, torch.compile(experts, fullgraph=True, backend="aot_eager")):
        xg = x.clone().requires_grad_()
        y = module(xg, ids, w)
        y.backward(gy)
        outputs.append((y.detach(), xg.grad))
    for eager, compiled in zip(*outputs):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
