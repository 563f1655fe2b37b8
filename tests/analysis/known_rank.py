"""Checkpoints whose expert deltas have exactly known spectra, in every family's real on-disk layout.

Experts come in +D / -D pairs, so the mean expert is exactly zero and delta_e = +-D. Each D is a sum of
4 rank-one terms s_k * u_k v_k^T with u_k disjoint blocks of rows (of ones) and v_k distinct Hadamard
rows, so its singular values are s_k * sqrt(rows_k * in): with s = (6, 4, 2, 1) the energy fractions
are 36/57, 52/57, 56/57, 1, giving 90/95/99%-energy ranks 2, 3, 4. Every entry is +-s_k, exact in
bf16, FP8 E4M3 (scale 1) and MXFP4 (each 32-wide block holds one magnitude).

With ``shared_base=True`` every expert also holds one +-8 sign matrix per projection (entries 8 +- s_k stay
small integers, exact in bf16): a shared base plus exactly low-rank deltas, i.e. a pseudo-MoE whose deltas
from the mean are still exactly +-D.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.fixtures.checkpoints import CONFIGS, _randomise_small_params, _read_all, _update_config

S = (6.0, 4.0, 2.0, 1.0)
EXPECTED_RANKS = {0.90: 2, 0.95: 3, 0.99: 4}


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix ``[n, n]`` of +-1 (n a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def known_delta(out_dim: int, in_dim: int, index: int) -> torch.Tensor:
    """``[out, in]`` float32 delta with singular values s_k * sqrt(out/4 * in); ``index`` picks the Hadamard rows."""
    h = hadamard(in_dim)
    d = torch.zeros(out_dim, in_dim)
    rows = out_dim // len(S)
    for k, s in enumerate(S):
        d[k * rows:(k + 1) * rows] = s * h[(1 + k + len(S) * index) % in_dim]
    return d


def _shared_base(out_dim: int, in_dim: int, seed: int) -> torch.Tensor:
    """``[out, in]`` float32 of +-8 (a full-rank sign matrix), the same for every expert."""
    g = torch.Generator().manual_seed(seed)
    return 8.0 * torch.randint(0, 2, (out_dim, in_dim), generator=g).float().mul(2.0).sub(1.0)


def _expert_triplet(e: int, n_experts: int, inter: int, hidden: int, shared_base: bool = False
                    ) -> tuple[torch.Tensor, ...]:
    sign = 1.0 if e % 2 == 0 else -1.0
    pair = e // 2
    gate = sign * known_delta(inter, hidden, pair)
    up = sign * known_delta(inter, hidden, pair + n_experts // 2)
    down = sign * known_delta(hidden, inter, pair)
    if shared_base:
        gate, up, down = gate + _shared_base(inter, hidden, 1), up + _shared_base(inter, hidden, 2), \
            down + _shared_base(hidden, inter, 3)
    return gate, up, down


def write_known_rank_checkpoint(family: str, directory: Path, *, storage: str = "bf16", shared_base: bool = False
                                ) -> Path:
    """Write ``family`` with known-spectrum experts; ``storage`` in {"bf16", "fp8", "mxfp4" (gpt_oss only)};
    ``shared_base`` (bf16 / fp8 only) adds the same +-8 base to every expert (see the module docstring).

    GPT-OSS also gets LARGE expert biases (norm far above the weights'): they must not change the ranks.
    """
    from transformers import AutoModelForCausalLM

    if shared_base and storage == "mxfp4":
        raise ValueError("shared_base needs bf16 or fp8 storage (8 +- s_k is not exact in MXFP4 blocks)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    _randomise_small_params(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("experts.gate_up_proj"):
                n_experts = p.shape[0]
                for e in range(n_experts):
                    if family == "gpt_oss":  # [E, H, 2I], gate/up interleaved on the last axis
                        hidden, inter = p.shape[1], p.shape[2] // 2
                        gate, up, _ = _expert_triplet(e, n_experts, inter, hidden, shared_base)
                        p[e, :, 0::2] = gate.T
                        p[e, :, 1::2] = up.T
                    else:  # [E, 2I, H], gate rows above up rows
                        inter, hidden = p.shape[1] // 2, p.shape[2]
                        gate, up, _ = _expert_triplet(e, n_experts, inter, hidden, shared_base)
                        p[e] = torch.cat([gate, up], 0)
            elif name.endswith("experts.down_proj"):
                n_experts = p.shape[0]
                for e in range(n_experts):
                    if family == "gpt_oss":  # [E, I, H]
                        inter, hidden = p.shape[1], p.shape[2]
                        p[e] = _expert_triplet(e, n_experts, inter, hidden, shared_base)[2].T
                    else:  # [E, H, I]
                        hidden, inter = p.shape[1], p.shape[2]
                        p[e] = _expert_triplet(e, n_experts, inter, hidden, shared_base)[2]
            elif family == "dbrx" and name.endswith(("experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2")):
                # [E*I, H]: expert e's rows e*I:(e+1)*I are its gate (w1) / up (v1) / down TRANSPOSED (w2)
                hidden = p.shape[1]
                n_experts = model.config.ffn_config.moe_num_experts
                inter = p.shape[0] // n_experts
                slot = {"w1": 0, "v1": 1, "w2": 2}[name.rsplit(".", 1)[-1]]
                for e in range(n_experts):
                    w = _expert_triplet(e, n_experts, inter, hidden, shared_base)[slot]
                    p[e * inter:(e + 1) * inter] = w.T if slot == 2 else w
            elif name.endswith("experts.gate_up_proj_bias") or name.endswith("experts.down_proj_bias"):
                p.copy_(torch.randn_like(p) * 50.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(directory)
    if storage == "bf16":
        return directory
    tensors, metadata = _read_all(directory / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if storage == "mxfp4" and (name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")):
            from lazarus_core.ops import mxfp4_quantize

            blocks, scales = mxfp4_quantize(t.transpose(1, 2).float().contiguous())
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
        elif storage == "fp8" and ".experts." in name and name.endswith("_proj.weight"):
            out[name] = t.float().to(torch.float8_e4m3fn)  # +-s_k are exact in E4M3 at scale 1
            out[name + "_scale_inv"] = torch.ones(-(-t.shape[0] // 16), -(-t.shape[1] // 16))
        else:
            out[name] = t
    from safetensors.torch import save_file

    save_file(out, str(directory / "model.safetensors"), metadata=metadata)
    if storage == "mxfp4":
        _update_config(directory, quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    else:
        _update_config(directory, quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                       "activation_scheme": "dynamic", "weight_block_size": [16, 16]})
    return directory
