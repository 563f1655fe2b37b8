"""Analysing a layer keeps resident memory to a few experts, not E experts (Linux: VmHWM)."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from lazarus_core.analysis.expert_structure import analyze_projection
from lazarus_core.models import open_moe_checkpoint
from tests.memory import reset_peak, status_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_layer_analysis_peak_memory_is_a_few_experts(tmp_path):
    experts, out_dim, in_dim = 12, 512, 2048  # 4 MiB per fp32 expert, 48 MiB for the projection
    config = {"model_type": "olmoe", "num_hidden_layers": 1, "hidden_size": in_dim, "intermediate_size": out_dim,
              "num_experts": experts, "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {}
    for e in range(experts):
        for name, shape in (("gate_proj", (out_dim, in_dim)), ("up_proj", (out_dim, in_dim)), ("down_proj", (in_dim, out_dim))):
            tensors[f"model.layers.0.mlp.experts.{e}.{name}.weight"] = torch.randn(shape).bfloat16()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = open_moe_checkpoint(tmp_path)
    analyze_projection(ckpt, 0, "up")  # warm-up: lazy imports, allocator pools, BLAS/LAPACK workspaces
    baseline = reset_peak()
    result = analyze_projection(ckpt, 0, "up")
    growth = status_mb("VmHWM") - baseline
    expert_mb = out_dim * in_dim * 4 / 2**20
    assert len(result.experts_rank_95) == experts
    assert growth < 8 * expert_mb, f"peak grew {growth:.1f} MiB = {growth / expert_mb:.1f} experts (of {experts})"
