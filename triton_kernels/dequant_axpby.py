"""Fused decode + axpby in Triton: out = alpha * decode(src) + beta * y (MXFP4 or float sources)."""

import torch
import triton
import triton.language as tl

from lazarus_core.ops._backends import triton_interpreter_enabled
from lazarus_core.triton_kernels._mxfp4_math import e2m1_to_f32, e8m0_to_f32

DEFAULT_BLOCK_G = 64
DEFAULT_BLOCK_N = 4096


@triton.jit
def _mul(a, b, EXACT: tl.constexpr):
    """fp32 product rounded on its own. On the GPU ``mul.rn`` keeps the compiler from contracting
    ``alpha * w + beta * y`` into an FMA, so every backend rounds each product, then the sum (bit-identical
    results). The interpreter (EXACT=False) computes in numpy, which never contracts."""
    if EXACT:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return a * b


@triton.jit
def _mxfp4_axpby_kernel(blocks_ptr, scales_ptr, y_ptr, out_ptr, n_blocks, alpha, beta, BLOCK_G: tl.constexpr,
                        EXACT: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    in_range = g < n_blocks
    mask = in_range[:, None]
    packed = tl.load(blocks_ptr + g[:, None] * 16 + tl.arange(0, 16)[None, :], mask=mask, other=0).to(tl.int32)
    scale = e8m0_to_f32(tl.load(scales_ptr + g, mask=in_range, other=127).to(tl.int32))[:, None]
    w = e2m1_to_f32(tl.interleave(packed & 15, packed >> 4)) * scale        # [BLOCK_G, 32] in memory order
    idx = g[:, None] * 32 + tl.arange(0, 32)[None, :]
    y = tl.load(y_ptr + idx, mask=mask, other=0.0)
    out = _mul(tl.zeros_like(w) + alpha, w, EXACT) + _mul(tl.zeros_like(y) + beta, y, EXACT)
    tl.store(out_ptr + idx, out, mask=mask)


@triton.jit
def _float_axpby_kernel(src_ptr, y_ptr, out_ptr, n, alpha, beta, BLOCK_N: tl.constexpr, EXACT: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask = i < n
    w = tl.load(src_ptr + i, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + i, mask=mask, other=0.0)
    tl.store(out_ptr + i, _mul(tl.zeros_like(w) + alpha, w, EXACT) + _mul(tl.zeros_like(y) + beta, y, EXACT),
             mask=mask)


def dequant_axpby_triton(weight: torch.Tensor, scales: torch.Tensor | None, y: torch.Tensor, out: torch.Tensor,
                         alpha: float, beta: float) -> None:
    """``out = alpha * decode(weight[, scales]) + beta * y`` on contiguous tensors (validated by the op).

    Parameters
    ----------
    weight : torch.Tensor
        uint8 MXFP4 blocks ``[..., G, 16]`` (with ``scales``) or a float tensor (fp32/bf16/fp16).
    scales : torch.Tensor or None
        uint8 ``[..., G]`` for MXFP4, else None.
    y, out : torch.Tensor
        fp32, same number of values as the decoded weight; may be the same tensor.
    alpha, beta : float
    """
    exact = weight.device.type == "cuda" and not triton_interpreter_enabled()
    if scales is not None:
        n_blocks = scales.numel()
        grid = (triton.cdiv(n_blocks, DEFAULT_BLOCK_G),)
        _mxfp4_axpby_kernel[grid](weight, scales, y, out, n_blocks, alpha, beta, BLOCK_G=DEFAULT_BLOCK_G, EXACT=exact)
    else:
        n = weight.numel()
        grid = (triton.cdiv(n, DEFAULT_BLOCK_N),)
        _float_axpby_kernel[grid](weight, y, out, n, alpha, beta, BLOCK_N=DEFAULT_BLOCK_N, EXACT=exact)
