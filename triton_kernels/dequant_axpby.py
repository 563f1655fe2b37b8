"""Fused decode + axpby in Triton: out = alpha * decode(src) + beta * y (MXFP4 or float sources)."""

import torch
import triton
import triton.language as tl

from lazarus_core.triton_kernels._mxfp4_math import e2m1_to_f32, e8m0_to_f32

DEFAULT_BLOCK_G = 64
DEFAULT_BLOCK_N = 4096


@triton.jit
def _mxfp4_axpby_kernel(blocks_ptr, scales_ptr, y_ptr, out_ptr, n_blocks, alpha, beta, BLOCK_G: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    j = tl.arange(0, 16)
    in_range = g < n_blocks
    mask = in_range[:, None]
    packed = tl.load(blocks_ptr + g[:, None] * 16 + j[None, :], mask=mask, other=0).to(tl.int32)
    scale = e8m0_to_f32(tl.load(scales_ptr + g, mask=in_range, other=127).to(tl.int32))[:, None]
    idx = g[:, None] * 32 + 2 * j[None, :]
    y_even = tl.load(y_ptr + idx, mask=mask, other=0.0)
    y_odd = tl.load(y_ptr + idx + 1, mask=mask, other=0.0)
    tl.store(out_ptr + idx, alpha * (e2m1_to_f32(packed & 15) * scale) + beta * y_even, mask=mask)
    tl.store(out_ptr + idx + 1, alpha * (e2m1_to_f32(packed >> 4) * scale) + beta * y_odd, mask=mask)


@triton.jit
def _float_axpby_kernel(src_ptr, y_ptr, out_ptr, n, alpha, beta, BLOCK_N: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask = i < n
    w = tl.load(src_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, alpha * w + beta * tl.load(y_ptr + i, mask=mask, other=0.0), mask=mask)


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
    if scales is not None:
        n_blocks = scales.numel()
        grid = (triton.cdiv(n_blocks, DEFAULT_BLOCK_G),)
        _mxfp4_axpby_kernel[grid](weight, scales, y, out, n_blocks, alpha, beta, BLOCK_G=DEFAULT_BLOCK_G)
    else:
        n = weight.numel()
        grid = (triton.cdiv(n, DEFAULT_BLOCK_N),)
        _float_axpby_kernel[grid](weight, y, out, n, alpha, beta, BLOCK_N=DEFAULT_BLOCK_N)
