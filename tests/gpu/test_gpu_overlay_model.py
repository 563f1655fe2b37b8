"""load_model on a CUDA device: the experts run the overlay's CUDA / Triton kernels inside a real transformers
model, and match the same overlay model on the CPU. Skipped, with the reason, where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch

from lazarus_core.models import open_moe_checkpoint
from lazarus_core.overlay import load_model, make_policy, plan_overlay, write_overlay

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["gpt_oss_mxfp4", "qwen3_moe", "deepseek_v3", "dbrx"])
def test_overlay_model_on_gpu_matches_cpu(checkpoint_dir, tmp_path, name, backend):
    src = str(checkpoint_dir(name))
    ckpt = open_moe_checkpoint(src)
    write_overlay(ckpt, tmp_path / "ov", plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=3), dtype="fp32"),
                  model=src)
    cpu_model = load_model(overlay=tmp_path / "ov", backend="torch")
    gpu_model = load_model(overlay=tmp_path / "ov", backend=backend, device="cuda")
    ids = torch.randint(0, cpu_model.config.vocab_size, (2, 13))
    with torch.no_grad():
        expected = cpu_model(ids).logits
        got = gpu_model(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    out = gpu_model.generate(ids[:1, :5].cuda(), **kw)
    assert out.shape == (1, 9) and out.device.type == "cuda"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_decode_matches_eager(checkpoint_dir, tmp_path, backend):
    src = str(checkpoint_dir("gpt_oss_mxfp4"))
    ckpt = open_moe_checkpoint(src)
    write_overlay(ckpt, tmp_path / "ov", plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=3), dtype="fp32"),
                  model=src)
    eager = load_model(overlay=tmp_path / "ov", backend=backend, device="cuda", cuda_graphs=False)
    graphed = load_model(overlay=tmp_path / "ov", backend=backend, device="cuda")
    ids = torch.randint(0, eager.config.vocab_size, (1, 6), device="cuda")
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        assert torch.equal(graphed.generate(ids, **kw), eager.generate(ids, **kw))
        caches = [m._lazarus_graphs for m in graphed.modules() if getattr(m, "_lazarus_graphs", None) is not None]
        assert caches and all(len(c) >= 1 for c in caches)          # decode steps replayed captured graphs
        for t in (1, 3):                                            # replays with fresh inputs, two shapes
            x = torch.randint(0, eager.config.vocab_size, (1, t), device="cuda")
            torch.testing.assert_close(graphed(x).logits, eager(x).logits, atol=1e-5, rtol=1e-5)
