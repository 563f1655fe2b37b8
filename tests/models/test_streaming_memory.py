"""Streaming all experts keeps resident memory to a few experts, not E experts (Linux: VmHWM), through
iter_experts and through per-call encoded reads (the spectra's passes)."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from lazarus_core.models import open_moe_checkpoint
from tests.memory import reset_peak, status_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

STREAMS = {
    "iter_experts": lambda ckpt, experts: (w for _, w in ckpt.iter_experts(0, "up")),
    "encoded_expert": lambda ckpt, experts: (ckpt.encoded_expert(0, "up", e).decode() for e in range(experts)),
}


@pytest.mark.parametrize("stream", sorted(STREAMS))
def test_peak_rss_stays_within_a_few_experts(tmp_path, stream):
    experts, out_dim, in_dim = 16, 1024, 2048  # 8 MiB decoded per expert, 128 MiB for all
    config = {"model_type": "olmoe", "num_hidden_layers": 1, "hidden_size": in_dim, "intermediate_size": out_dim,
              "num_experts": experts, "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({f"model.layers.0.mlp.experts.{e}.up_proj.weight": torch.randn(out_dim, in_dim).bfloat16()
               for e in range(experts)}, str(tmp_path / "model.safetensors"))
    ckpt = open_moe_checkpoint(tmp_path)
    ckpt.expert_weight(0, "up", 0)  # warm up lazy imports and the file handle
    baseline = reset_peak()
    total = 0.0
    for w in STREAMS[stream](ckpt, experts):
        total += float(w[0, 0])
    expert_mb = out_dim * in_dim * 4 / 2**20
    growth = status_mb("VmHWM") - baseline
    assert growth < 6 * expert_mb, f"peak grew {growth:.1f} MiB = {growth / expert_mb:.1f} experts (of {experts})"
