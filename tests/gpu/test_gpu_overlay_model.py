"""load_model on a CUDA device: the experts run the overlay's CUDA / Triton kernels inside a real transformers
model, and match the same overlay model on the CPU. Skipped, with the reason, where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch

from lazarus_core.models import open_moe_checkpoint
from lazarus_core.overlay import load_model, make_policy, plan_overlay, write_overlay

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["gpt_oss_mxfp4", "qwen3_moe", "deepseek_v3"])
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
