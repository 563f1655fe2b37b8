"""Every op's CUDA and Triton backends on a real GPU, against the same independent oracles the CPU tests use.

Skipped, with the reason, where no CUDA device is present. Run them for real with
``TRITON_INTERPRET=0 python -m pytest -q tests/gpu`` (the test-wide default is the CPU interpreter, which would
run the Triton kernels in numpy instead of compiling them).

Each check draws fresh random inputs, uses odd sizes (and sizes large enough for many thread blocks), poisons
reused output buffers first, and compares bit-exactly where the op is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lazarus_core.ops import (
    dequant_axpby,
    dequant_axpby_reference,
    fp8_dequant,
    fp8_dequant_reference,
    mxfp4_dequant,
    mxfp4_quantize,
    overlay_moe_forward,
    overlay_moe_forward_reference,
)
from tests.ops.mxfp4_oracle import assert_same_floats, decode_f64, quantize_f64
from tests.overlay.random_overlay import random_overlay, random_routing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
EDGE_SCALES = [0, 1, 2, 100, 127, 128, 200, 253, 254, 255]


def _poisoned(shape, dtype) -> torch.Tensor:
    """A CUDA buffer full of NaN, so an element the kernel forgets to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


# ---------------------------------------------------------------- mxfp4_dequant


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_mxfp4_dequant_every_byte_every_edge_scale(backend, dtype):
    # 16 blocks x 16 bytes cover all 256 byte values; one row per edge scale byte.
    blocks = torch.arange(256, dtype=torch.int64).to(torch.uint8).reshape(16, 16).repeat(len(EDGE_SCALES), 1, 1)
    scales = torch.tensor(EDGE_SCALES, dtype=torch.uint8)[:, None].repeat(1, 16)
    out = mxfp4_dequant(blocks.cuda(), scales.cuda(), dtype=dtype, backend=backend).cpu()
    expected = torch.from_numpy(decode_f64(blocks.numpy(), scales.numpy())).to(dtype)
    assert_same_floats(out, expected)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead", [(1,), (7, 33), (3, 5, 1), (2, 1001, 90)], ids=str)
def test_mxfp4_dequant_random_into_poisoned_out(backend, dtype, lead):
    blocks = torch.randint(0, 256, (*lead, 16), dtype=torch.uint8)
    scales = torch.randint(0, 256, lead, dtype=torch.uint8)
    out = _poisoned((*lead[:-1], lead[-1] * 32), dtype)
    mxfp4_dequant(blocks.cuda(), scales.cuda(), dtype=dtype, out=out, backend=backend)
    assert_same_floats(out.cpu(), torch.from_numpy(decode_f64(blocks.numpy(), scales.numpy())).to(dtype))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mxfp4_dequant_strided_and_empty(backend):
    blocks = torch.randint(0, 256, (6, 4, 16), dtype=torch.uint8)
    scales = torch.randint(100, 150, (6, 4), dtype=torch.uint8)
    view_b, view_s = blocks.cuda()[::2], scales.cuda()[::2]     # non-contiguous views
    out = mxfp4_dequant(view_b, view_s, backend=backend).cpu()
    assert_same_floats(out, torch.from_numpy(decode_f64(blocks[::2].numpy(), scales[::2].numpy())).float())
    empty = mxfp4_dequant(torch.zeros(0, 3, 16, dtype=torch.uint8, device="cuda"),
                          torch.zeros(0, 3, dtype=torch.uint8, device="cuda"), backend=backend)
    assert empty.shape == (0, 96) and empty.device.type == "cuda"


def test_mxfp4_dequant_auto_picks_a_gpu_kernel():
    blocks = torch.randint(0, 256, (5, 16), dtype=torch.uint8)
    scales = torch.randint(120, 135, (5,), dtype=torch.uint8)
    out = mxfp4_dequant(blocks.cuda(), scales.cuda())
    assert out.device.type == "cuda"
    assert_same_floats(out.cpu(), torch.from_numpy(decode_f64(blocks.numpy(), scales.numpy())).float())


# ---------------------------------------------------------------- mxfp4_quantize


def _spread_weights(shape) -> torch.Tensor:
    # Rows whose magnitudes span many binades, so blocks exercise many scale bytes.
    return torch.randn(shape) * torch.exp2(torch.randint(-30, 30, (*shape[:-1], 1)).float())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(32,), (5, 7, 96), (257, 64)], ids=str)
def test_mxfp4_quantize_matches_bruteforce_oracle(backend, shape):
    w = _spread_weights(shape)
    w.view(-1)[:3] = torch.tensor([0.0, -0.0, 1e-40])          # zeros and an fp32 subnormal
    blocks, scales = mxfp4_quantize(w.cuda(), backend=backend)
    ref_blocks, ref_scales = quantize_f64(w.numpy())
    np.testing.assert_array_equal(scales.cpu().numpy(), ref_scales)
    np.testing.assert_array_equal(blocks.cpu().numpy(), ref_blocks)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mxfp4_quantize_ties_and_round_trip(backend):
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    row = torch.zeros(32)
    row[0] = 6.0
    row[1:8] = torch.tensor(ties)
    row[10:17] = -torch.tensor(ties)
    decoded = mxfp4_dequant(*mxfp4_quantize(row.cuda(), backend=backend)).cpu()
    assert decoded[1:8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert decoded[10:17].tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    # Values already on the grid come back exactly.
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]).repeat(4) * 2.0 ** -3
    again = mxfp4_dequant(*mxfp4_quantize(grid.reshape(1, 32).cuda(), backend=backend)).cpu()
    assert torch.equal(again.reshape(32), grid)


# ---------------------------------------------------------------- fp8_dequant


def _e4m3fn_table() -> np.ndarray:
    """All 256 E4M3FN values in float64, written from the spec (S.1111.111 is NaN, no Inf)."""
    out = np.empty(256)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exponent, mantissa = (byte >> 3) & 15, byte & 7
        if exponent == 15 and mantissa == 7:
            out[byte] = np.nan
        elif exponent == 0:
            out[byte] = sign * mantissa / 8.0 * 2.0 ** -6
        else:
            out[byte] = sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)
    return out


def _fp8_expected(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    values = _e4m3fn_table()[weight.numpy()]
    rows, cols = weight.shape[-2:]
    s = scale_inv.double().numpy()
    s = np.repeat(np.repeat(s, block[0], axis=-2)[..., :rows, :], block[1], axis=-1)[..., :cols]
    # fp32 product as the kernels compute it: decode (exact in fp32), scale in fp32, then round to dtype.
    prod = torch.from_numpy(values).float() * torch.from_numpy(s).float()
    return prod.to(dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,block", [((16, 16), (128, 128)), ((3, 257, 130), (128, 128)), ((129, 67), (32, 16)),
                                         ((1, 1), (128, 128)), ((2, 33, 96), (7, 24)), ((300, 1024), (128, 128))],
                         ids=str)
def test_fp8_dequant_matches_oracle(backend, dtype, shape, block):
    weight = torch.randint(0, 256, shape, dtype=torch.uint8)
    if shape == (16, 16):
        weight = torch.arange(256, dtype=torch.int64).to(torch.uint8).reshape(16, 16)   # every byte
    grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    scale_inv = torch.randn(grid) * 3
    out = _poisoned(shape, dtype)
    fp8_dequant(weight.cuda(), scale_inv.cuda(), block_size=block, dtype=dtype, out=out, backend=backend)
    assert_same_floats(out.cpu(), _fp8_expected(weight, scale_inv, block, dtype))
    ref = fp8_dequant_reference(weight, scale_inv, block_size=block, dtype=dtype)
    assert_same_floats(out.cpu(), ref)


# ---------------------------------------------------------------- dequant_axpby


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (1.0 / 7.0, 1.0), (-0.5, 2.5), (0.0, 1.0)], ids=str)
def test_dequant_axpby_mxfp4_source(backend, alpha, beta):
    blocks = torch.randint(0, 256, (37, 90, 16), dtype=torch.uint8)
    scales = torch.randint(110, 140, (37, 90), dtype=torch.uint8)
    scales[3, 4] = 0xFF                                            # a NaN block
    y = torch.randn(37, 90 * 32)
    out = dequant_axpby(blocks.cuda(), y.cuda(), scales=scales.cuda(), alpha=alpha, beta=beta, backend=backend).cpu()
    expected = dequant_axpby_reference(blocks, y, scales=scales, alpha=alpha, beta=beta)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_dequant_axpby_float_source_running_mean(backend, dtype):
    experts = [torch.randn(129, 301).to(dtype) for _ in range(5)]
    mean = torch.zeros(129, 301, device="cuda")
    for w in experts:
        dequant_axpby(w.cuda(), mean, alpha=1.0 / len(experts), out=mean, backend=backend)
    expected = torch.zeros(129, 301)
    for w in experts:
        expected = dequant_axpby_reference(w, expected, alpha=1.0 / len(experts))
    torch.testing.assert_close(mean.cpu(), expected, rtol=0, atol=0)    # exact on every source (no FMA)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dequant_axpby_mxfp4_at_odd_float_offsets(backend):
    # y and out as views one float into their buffers (4-byte, not 8-byte aligned): the CUDA kernel read them as
    # float2 with no check and faulted; it now takes the scalar path there.
    blocks = torch.randint(0, 256, (33, 3, 16), dtype=torch.uint8)
    scales = torch.randint(110, 140, (33, 3), dtype=torch.uint8)
    y_buf, out_buf = torch.randn(33 * 96 + 1, device="cuda"), _poisoned((33 * 96 + 1,), torch.float32)
    y, out = y_buf[1:].view(33, 96), out_buf[1:].view(33, 96)
    assert y.data_ptr() % 8 == 4 and out.data_ptr() % 8 == 4
    dequant_axpby(blocks.cuda(), y, scales=scales.cuda(), alpha=1 / 7, beta=-2.0, out=out, backend=backend)
    expected = dequant_axpby_reference(blocks, y.cpu(), scales=scales, alpha=1 / 7, beta=-2.0)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)
    assert torch.isnan(out_buf[0])                                   # nothing written before the view


# ---------------------------------------------------------------- overlay_moe_forward


def _on_cuda(ex):
    """The same overlay (stored dtypes, MXFP4 blocks included) on the GPU."""
    from dataclasses import replace

    return replace(ex, **{n: t.cuda() for n, t in ex.tensors().items()})


def _assert_near_float64(out: torch.Tensor, x, ids, w, ex, tol: float = 5e-6) -> None:
    """``out`` (from the GPU) against the reference computed in float64 on the same stored values: relative
    Frobenius error < ``tol``.

    fp32 summed in any order lands near 1e-7 to 1e-6 here; a wrong index, a missed pair or a lost term is
    orders of magnitude above."""
    ref = overlay_moe_forward_reference(x.double(), ids, w.double(), ex.to_float(torch.float64))
    err = float((out.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30))
    assert torch.isfinite(out).all() and err < tol, f"relative error {err:.2e} vs the float64 reference"


_STORED = [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.bfloat16, "mxfp4"), (torch.float16, "fp32")]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("factor_dtype,base", _STORED, ids=["fp32", "bf16", "bf16+mxfp4", "fp16+fp32base"])
@pytest.mark.parametrize("tokens,top_k,ranks", [(1, 1, (1, 1, 1)), (7, 2, (3, 5, 2)), (13, 4, (0, 0, 0)),
                                                (5, 8, (4, 1, 0)), (257, 4, (16, 9, 33))],
                         ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gpt_oss", True)], ids=["swiglu", "gpt_oss+bias"])
def test_overlay_moe_matches_reference(backend, factor_dtype, base, tokens, top_k, ranks, activation, bias):
    if base == "mxfp4":
        hidden, inter = (64, 96) if tokens < 100 else (320, 544)
    else:
        hidden, inter = (37, 21) if tokens < 100 else (301, 517)    # the large case spans many column blocks
    ex = random_overlay(9, hidden, inter, ranks, bias=bias, activation=activation, factor_dtype=factor_dtype,
                        base=base)
    x = torch.randn(tokens, hidden) * 2
    ids, w = random_routing(tokens, 9, top_k)
    out = overlay_moe_forward(x.cuda(), ids.cuda(), w.cuda(), _on_cuda(ex), backend=backend)
    assert out.device.type == "cuda" and out.shape == (tokens, hidden) and out.dtype == torch.float32
    _assert_near_float64(out, x, ids, w, ex)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("keep", ["gate", "up", "down"])
def test_overlay_moe_each_bias_on_its_own(backend, keep):
    from dataclasses import replace

    full = random_overlay(5, 37, 21, (3, 2, 4), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16)
    ex = replace(full, **{f"bias_{p}": None for p in ("gate", "up", "down") if p != keep})
    x = torch.randn(9, 37)
    ids, w = random_routing(9, 5, 2)
    _assert_near_float64(overlay_moe_forward(x.cuda(), ids.cuda(), w.cuda(), _on_cuda(ex), backend=backend),
                         x, ids, w, ex)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_overlay_moe_more_than_65535_tokens(backend):
    # The old CUDA kernels put tokens on gridDim.y (at most 65,535): this launch failed.
    ex = random_overlay(8, 64, 32, (2, 3, 2), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16,
                        base="mxfp4")
    x = torch.randn(70000, 64)
    ids, w = random_routing(70000, 8, 2)
    out = overlay_moe_forward(x.cuda(), ids.cuda(), w.cuda(), _on_cuda(ex), backend=backend)
    _assert_near_float64(out, x, ids, w, ex)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_overlay_moe_clamp_edges_nan_and_repeated_expert(backend):
    ex = random_overlay(3, 33, 17, (2, 2, 2), bias=True, activation="gpt_oss", scale=2.0)
    x = torch.randn(11, 33) * 10
    ids = torch.tensor([[1, 0]] * 11)
    w = torch.rand(11, 2)
    out = overlay_moe_forward(x.cuda(), ids.cuda(), w.cuda(), _on_cuda(ex), backend=backend)
    _assert_near_float64(out, x, ids, w, ex)
    x[4, 0] = float("nan")          # transformers' torch.clamp keeps NaN; fminf-style clamps made it +-limit
    out = overlay_moe_forward(x.cuda(), ids.cuda(), w.cuda(), _on_cuda(ex), backend=backend).cpu()
    ref = overlay_moe_forward_reference(x, ids, w, ex)
    assert torch.isnan(ref[4]).all() and torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_overlay_moe_zero_tokens_and_bf16(backend):
    ex_cpu = random_overlay(4, 32, 64, (1, 1, 1), bias=False, activation="swiglu", factor_dtype=torch.bfloat16,
                            base="bf16")
    ex = _on_cuda(ex_cpu)
    out = overlay_moe_forward(torch.empty(0, 32, device="cuda"), torch.empty(0, 2, dtype=torch.int64, device="cuda"),
                              torch.empty(0, 2, device="cuda"), ex, backend=backend)
    assert out.shape == (0, 32)
    x = torch.randn(3, 32)
    ids, w = random_routing(3, 4, 2)
    out = overlay_moe_forward(x.to(torch.bfloat16).cuda(), ids.cuda(), w.cuda(), ex, backend=backend)
    assert out.dtype == torch.bfloat16        # the base product in bf16 (cuBLAS, fp32 accumulation)
    ref = overlay_moe_forward_reference(x.to(torch.bfloat16).float(), ids, w, ex_cpu.to_float())
    torch.testing.assert_close(out.float().cpu(), ref, atol=0.05, rtol=0.02)
