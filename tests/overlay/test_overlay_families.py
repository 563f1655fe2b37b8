"""The overlay forward against each family's ORIGINAL transformers experts module holding the reconstructed
weights ``base + A[e] @ B[e]``: GPT-OSS clamped SwiGLU with (up + 1) and biases, SwiGLU elsewhere (DBRX: its
fused ``[E*I, H]`` w1 / v1 / w2, w2 holding down transposed)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lazarus_core.ops import overlay_moe_forward
from tests.fixtures.checkpoints import CONFIGS
from tests.overlay.random_overlay import random_routing

FAMILIES = sorted(CONFIGS)


def _experts_module(family: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    return next(m for n, m in model.named_modules() if n.endswith(("mlp.experts", "ffn.experts"))).eval()


def _sizes(module: torch.nn.Module, family: str) -> tuple[int, int, int]:
    """(E, H, I) of an experts module."""
    if family == "dbrx":
        return module.num_experts, module.hidden_size, module.ffn_hidden_size
    if family == "gpt_oss":
        return module.gate_up_proj.shape[0], module.down_proj.shape[2], module.down_proj.shape[1]
    return module.gate_up_proj.shape[0], module.down_proj.shape[1], module.down_proj.shape[2]


def _set_weights(module: torch.nn.Module, family: str, ex) -> None:
    gate, up, down = (ex.reconstruct(p) for p in ("gate", "up", "down"))
    with torch.no_grad():
        if family == "dbrx":  # [E*I, H] each; w2 is down [E, H, I] transposed per expert
            module.mlp.w1.data = gate.reshape(-1, gate.shape[2]).contiguous()
            module.mlp.v1.data = up.reshape(-1, up.shape[2]).contiguous()
            module.mlp.w2.data = down.transpose(1, 2).reshape(-1, down.shape[1]).contiguous()
        elif family == "gpt_oss":  # [E, H, 2I] interleaved, [E, I, H], biases
            module.gate_up_proj.data = torch.stack([gate, up], -1).permute(0, 2, 1, 3).reshape(
                gate.shape[0], gate.shape[2], -1).contiguous()
            module.down_proj.data = down.transpose(1, 2).contiguous()
            module.gate_up_proj_bias.data = torch.stack([ex.bias_gate, ex.bias_up], -1).reshape(gate.shape[0], -1)
            module.down_proj_bias.data = ex.bias_down.clone()
        else:  # [E, 2I, H] gate rows above up rows, [E, H, I]
            module.gate_up_proj.data = torch.cat([gate, up], 1).contiguous()
            module.down_proj.data = down.contiguous()


@pytest.mark.parametrize("family", FAMILIES)
def test_overlay_matches_original_block(family):
    from lazarus_core.ops.overlay_moe import OverlayExperts

    module = _experts_module(family)
    n_experts, h, inter = _sizes(module, family)
    gpt = family == "gpt_oss"
    ranks = {"gate": 3, "up": 1, "down": 0} if family in ("olmoe", "qwen3_moe") else {"gate": 2, "up": 5, "down": 1}
    base = {"gate": torch.randn(inter, h) * 0.2, "up": torch.randn(inter, h) * 0.2, "down": torch.randn(h, inter) * 0.2}
    a = {p: torch.randn(n_experts, base[p].shape[0], r) * 0.3 for p, r in ranks.items()}
    b = {p: torch.randn(n_experts, r, base[p].shape[1]) * 0.3 for p, r in ranks.items()}
    bias = {"gate": torch.randn(n_experts, inter), "up": torch.randn(n_experts, inter),
            "down": torch.randn(n_experts, h)} if gpt else None
    ex = OverlayExperts.from_factors(base, a, b, bias, activation="gpt_oss" if gpt else "swiglu",
                                     alpha=getattr(module, "alpha", 1.702), limit=getattr(module, "limit", 7.0))
    _set_weights(module, family, ex)
    for k in (1, 2, 4, 8):
        if k > n_experts:
            continue
        tokens = 2 * k + 3  # odd
        x = torch.randn(tokens, h) * 3
        ids, w = random_routing(tokens, n_experts, k)
        with torch.no_grad():
            expected = module(x, ids, w).reshape(tokens, h)  # DBRX returns [T, 1, H]
        for backend in ("cpu", "torch"):
            got = overlay_moe_forward(x, ids, w, ex, backend=backend)
            torch.testing.assert_close(got, expected, atol=1e-4 * max(1.0, float(expected.abs().max())), rtol=1e-4)
