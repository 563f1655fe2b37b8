"""The Triton overlay forward (storage precision, pairs grouped by expert) in the interpreter against the readable
reference: fresh random overlays, odd sizes, T in {0, 1, 3, 17, 130}, each bias on its own, both activations,
bf16/fp16/fp32 factors, a float or an MXFP4 base; the tile map; the MXFP4 GEMM; NaN through the GPT-OSS clamp;
and every kernel compiled for sm_90."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lazarus_core.ops import mxfp4_dequant, overlay_moe_forward, overlay_moe_forward_reference
from lazarus_core.ops.overlay_moe import OverlayExperts
from lazarus_core.ops.overlay_moe_gpu import BLOCK_M, tile_map
from tests.overlay.random_overlay import random_overlay, random_routing

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="CPU tensors through Triton need TRITON_INTERPRET=1 (set by tests/conftest.py); "
                                       "tests/gpu runs these kernels compiled")


def _overlay(base_format: str, dtype: torch.dtype, *, bias: bool, activation: str, ranks=(3, 5, 2)) -> OverlayExperts:
    """7 experts; an MXFP4 base needs H and I in multiples of 32, a float one gets odd sizes (base in ``dtype``)."""
    if base_format == "mxfp4":
        return random_overlay(7, 64, 96, ranks, bias=bias, activation=activation, factor_dtype=dtype, base="mxfp4")
    return random_overlay(7, 37, 21, ranks, bias=bias, activation=activation, factor_dtype=dtype,
                          base={torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])


def _assert_matches_float64(out: torch.Tensor, x, ids, w, ex, tol: float = 2e-6) -> None:
    """Relative Frobenius error against the reference run in float64 on the same stored values."""
    ref = overlay_moe_forward_reference(x.double(), ids, w.double(), ex.to_float(torch.float64))
    assert out.shape == ref.shape
    err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    assert torch.isfinite(out).all() and err < tol, f"relative error {err:.2e} vs the float64 reference"


_FORMATS = {"fp32": ("float", torch.float32), "bf16": ("float", torch.bfloat16), "mxfp4": ("mxfp4", torch.bfloat16)}
_CASES = [(1, "fp32", "swiglu"), (3, "bf16", "gpt_oss"), (17, "mxfp4", "gpt_oss"), (1, "mxfp4", "swiglu"),
          (17, "bf16", "swiglu"), (3, "mxfp4", "gpt_oss"), (17, "fp32", "gpt_oss")]


@pytest.mark.parametrize("tokens,stored,activation", _CASES, ids=lambda v: str(v))
def test_matches_reference(tokens, stored, activation):
    # gpt_oss cases carry all three biases; swiglu cases none.
    ex = _overlay(*_FORMATS[stored], bias=activation == "gpt_oss", activation=activation)
    x = torch.randn(tokens, ex.hidden_size) * 2
    ids, w = random_routing(tokens, ex.num_experts, 3)
    out = overlay_moe_forward(x, ids, w, ex, backend="triton")
    assert out.dtype == x.dtype and out.shape == (tokens, ex.hidden_size)
    _assert_matches_float64(out, x, ids, w, ex)


@pytest.mark.parametrize("stored", sorted(_FORMATS))
def test_zero_tokens(stored):
    ex = _overlay(*_FORMATS[stored], bias=True, activation="gpt_oss")
    out = overlay_moe_forward(torch.zeros(0, ex.hidden_size), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2),
                              ex, backend="triton")
    assert out.shape == (0, ex.hidden_size)


def test_many_tokens_repeated_experts_fp16():
    # T = 130, k = 2 over 7 experts: two full tiles per expert plus a partial one; ranks over one dot step.
    ex = _overlay("mxfp4", torch.float16, bias=True, activation="gpt_oss", ranks=(17, 1, 33))
    x = torch.randn(130, ex.hidden_size)
    ids, w = random_routing(130, ex.num_experts, 2)
    _assert_matches_float64(overlay_moe_forward(x, ids, w, ex, backend="triton"), x, ids, w, ex)


def test_zero_ranks_and_top1():
    ex = _overlay("float", torch.bfloat16, bias=True, activation="swiglu", ranks=(0, 0, 0))
    x = torch.randn(5, ex.hidden_size)
    ids, w = random_routing(5, ex.num_experts, 1)
    _assert_matches_float64(overlay_moe_forward(x, ids, w, ex, backend="triton"), x, ids, w, ex)


@pytest.mark.parametrize("keep", ["gate", "up", "down", "gate+up"])
def test_each_bias_on_its_own(keep):
    # Defect: the old kernel read "has bias" from bias_gate alone (bias_up dropped; bias_gate alone crashed).
    full = _overlay("float", torch.float32, bias=True, activation="gpt_oss")
    ex = replace(full, **{f"bias_{p}": None for p in ("gate", "up", "down") if p not in keep.split("+")})
    x = torch.randn(9, ex.hidden_size)
    ids, w = random_routing(9, ex.num_experts, 2)
    out = overlay_moe_forward(x, ids, w, ex, backend="triton")
    _assert_matches_float64(out, x, ids, w, ex)
    no_bias = overlay_moe_forward_reference(x, ids, w, replace(ex, bias_gate=None, bias_up=None, bias_down=None))
    assert float((out - no_bias).abs().max()) > 0.1     # the kept bias matters: a dropped one would fail above


def test_bf16_hidden_states_use_the_bf16_base_product():
    ex = _overlay("float", torch.bfloat16, bias=False, activation="swiglu")
    x = torch.randn(6, ex.hidden_size).to(torch.bfloat16)
    ids, w = random_routing(6, ex.num_experts, 2)
    out = overlay_moe_forward(x, ids, w, ex, backend="triton")
    assert out.dtype == torch.bfloat16
    ref = overlay_moe_forward_reference(x.float(), ids, w, ex.to_float())
    torch.testing.assert_close(out.float(), ref, atol=0.05 * float(ref.abs().max()), rtol=0.02)


@pytest.mark.parametrize("activation", ["gpt_oss", "swiglu"])
def test_nan_propagates_through_the_clamp(activation):
    # transformers clamps with torch.clamp, which keeps NaN; min/max-style clamps turned NaN into +-limit.
    ex = _overlay("float", torch.float32, bias=True, activation=activation)
    x = torch.randn(4, ex.hidden_size)
    x[1, 3] = float("nan")
    ids, w = random_routing(4, ex.num_experts, 2)
    out = overlay_moe_forward(x, ids, w, ex, backend="triton")
    ref = overlay_moe_forward_reference(x, ids, w, ex)
    assert torch.isnan(ref[1]).all() and torch.equal(torch.isnan(out), torch.isnan(ref))
    torch.testing.assert_close(out[[0, 2, 3]], ref[[0, 2, 3]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens,top_k,n_experts", [(0, 2, 3), (1, 1, 5), (3, 4, 4), (40, 2, 3), (17, 8, 9)])
def test_tile_map_covers_every_pair_once(tokens, top_k, n_experts):
    ids = torch.randint(0, n_experts, (tokens, top_k))
    m = tile_map(ids, n_experts)
    flat = ids.reshape(-1)
    assert torch.equal(flat[m.slot], torch.sort(flat, stable=True).values)
    seen = []
    for e, row in zip(m.tile_expert.tolist(), m.tile_row.tolist()):
        if e < 0:
            continue
        end = min(row + BLOCK_M, int(m.offsets[e + 1]))
        assert int(m.offsets[e]) <= row < end
        assert bool((flat[m.slot[row:end]] == e).all())
        seen.extend(range(row, end))
    assert sorted(seen) == list(range(tokens * top_k))


@pytest.mark.parametrize("tokens,in_dim,dtype", [(1, 301, torch.bfloat16), (2, 200, torch.float32),
                                                 (40, 97, torch.float16)])
def test_grouped_shrink_split_k(tokens, in_dim, dtype):
    # Few tiles (decode) split the input dimension over programs; partials are summed after the kernel.
    from lazarus_core.triton_kernels import grouped_shrink_triton
    from lazarus_core.triton_kernels import overlay_moe as kernels

    n_experts, top_k, rank = 5, 2, 19
    ids, _ = random_routing(tokens, n_experts, top_k)
    m = tile_map(ids, n_experts)
    inp = torch.randn(tokens, in_dim)
    b = torch.randn(n_experts, rank, in_dim).to(dtype)
    out = grouped_shrink_triton(inp, m.token, m.tiles, b, tokens * top_k)
    expected = torch.einsum("prk,pk->pr", b.double()[ids.reshape(-1)[m.slot]], inp.double()[m.token])
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)
    split, k_chunk = kernels.shrink_split(m.tile_expert.numel(), in_dim)      # rank 19: one rank block
    assert split > 1 and (split - 1) * k_chunk < in_dim <= split * k_chunk     # the split path ran, covering K


@pytest.mark.parametrize("m,n,groups", [(1, 5, 1), (19, 70, 3), (4, 33, 2)])
def test_mxfp4_matmul_decodes_in_the_gemm(m, n, groups):
    from lazarus_core.triton_kernels import mxfp4_matmul_triton

    blocks = torch.randint(0, 256, (n, groups, 16), dtype=torch.uint8)
    scales = torch.randint(120, 134, (n, groups), dtype=torch.uint8)
    scales[0, 0] = 0xFF                                   # a NaN block: row 0 of the output is NaN
    a = torch.randn(m, groups * 32)
    weight = mxfp4_dequant(blocks, scales, backend="torch").reshape(n, -1).double()
    expected = a.double() @ weight.T
    out = mxfp4_matmul_triton(a, blocks, scales)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    bound = (a.double().abs() @ weight.abs().T)[:, 1:]     # fp32 accumulation error is a few ulps of this
    assert bool(((out[:, 1:].double() - expected[:, 1:]).abs() <= 4e-6 * bound).all())


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lazarus_core.triton_kernels import overlay_moe as k
target = GPUTarget("cuda", 90, 32)
tiles = {"tile_expert_ptr": "*i32", "tile_row_ptr": "*i64", "offsets_ptr": "*i64"}
def build(fn, sig, constexprs):
    sig = dict(sig, **{name: "constexpr" for name in constexprs})
    assert triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target).asm["cubin"]
fdt = "*bf16"                                    # factors as stored; one bias of gate/up (set on their own)
build(k._grouped_shrink_kernel, dict(tiles, inp_ptr="*fp32", rows_ptr="*i64", b_ptr=fdt, out_ptr="*fp32",
      in_dim="i64", rank="i64", pairs="i64", k_chunk="i64"), {"BLOCK_M": 16, "BLOCK_R": 32, "BLOCK_K": 64})
build(k._gate_up_expand_kernel, dict(tiles, gu0_ptr="*fp32", s_ptr="*fp32", slot_ptr="*i64", at_gate_ptr=fdt,
      at_up_ptr=fdt, bias_gate_ptr=fdt, bias_up_ptr=fdt, h_ptr="*fp32", inter="i64", rank_gate="i64",
      rank_up="i64", alpha="fp32", limit="fp32"),
      {"TOP_K": 4, "HAS_BIAS_GATE": True, "HAS_BIAS_UP": False, "ACTIVATION": 1, "BLOCK_M": 16, "BLOCK_N": 128,
       "BLOCK_R": 16})
build(k._down_expand_kernel, dict(tiles, s_ptr="*fp32", slot_ptr="*i64", weight_ptr="*fp32", at_down_ptr=fdt,
      bias_down_ptr=fdt, corr_ptr="*fp32", hidden="i64", rank_down="i64"),
      {"HAS_BIAS": True, "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_R": 16})
for a_dt, bf16 in (("fp32", False), ("bf16", True)):
    build(k._mxfp4_matmul_kernel, dict(a_ptr="*" + a_dt, blocks_ptr="*u8", scales_ptr="*u8", out_ptr="*fp32",
          m="i64", n="i64", groups="i64"), {"BLOCK_M": 16, "BLOCK_N": 64, "GROUPS": 2, "DOT_BF16": bf16})
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
