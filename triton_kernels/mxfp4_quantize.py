"""fp32 -> MXFP4 in Triton: each program quantises BLOCK_G blocks of 32 values."""

import torch
import triton
import triton.language as tl

from lazarus_core.triton_kernels._mxfp4_math import e8m0_to_f32, f32_to_e2m1

DEFAULT_BLOCK_G = 64


@triton.jit
def _mxfp4_quantize_kernel(w_ptr, blocks_ptr, scales_ptr, n_blocks, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    j = tl.arange(0, 16)
    in_range = g < n_blocks
    mask = in_range[:, None]
    src = w_ptr + g[:, None] * 32 + 2 * j[None, :]
    even = tl.load(src, mask=mask, other=0.0)
    odd = tl.load(src + 1, mask=mask, other=0.0)
    amax = tl.maximum(tl.max(tl.abs(even), axis=1), tl.max(tl.abs(odd), axis=1))
    # floor(log2(amax / 6)) from the fp32 exponent field (subnormals -> -127), then one exact step
    # up if 6 * 2^e still falls short of amax: the scale never clips.
    biased = ((amax / 6.0).to(tl.int32, bitcast=True) >> 23) & 0xFF
    exponent = tl.where(biased > 0, biased - 127, -127)
    exponent = tl.where((amax > 6.0 * e8m0_to_f32(exponent + 127)) & (exponent < 127), exponent + 1, exponent)
    inv_scale = e8m0_to_f32(127 - exponent)
    low = f32_to_e2m1(even * inv_scale[:, None])
    high = f32_to_e2m1(odd * inv_scale[:, None])
    tl.store(blocks_ptr + g[:, None] * 16 + j[None, :], (low | (high << 4)).to(tl.uint8), mask=mask)
    tl.store(scales_ptr + g, (exponent + 127).to(tl.uint8), mask=in_range)


def mxfp4_quantize_triton(w: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, block_g: int = DEFAULT_BLOCK_G) -> None:
    """Quantise contiguous fp32 ``w`` ``[..., K]`` into ``blocks`` ``[..., K//32, 16]`` and ``scales``.

    Parameters
    ----------
    w : torch.Tensor
        Contiguous finite fp32 (validated by :func:`lazarus_core.ops.mxfp4_quantize`).
    blocks, scales : torch.Tensor
        Contiguous uint8 outputs, written in place.
    block_g : int
        Blocks per program (a power of two).
    """
    n_blocks = scales.numel()
    grid = (triton.cdiv(n_blocks, block_g),)
    _mxfp4_quantize_kernel[grid](w, blocks, scales, n_blocks, BLOCK_G=block_g)
