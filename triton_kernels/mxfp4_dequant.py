"""MXFP4 -> fp32/bf16 in Triton: each program decodes BLOCK_G blocks of 32 values."""

import torch
import triton
import triton.language as tl

from lazarus_core.triton_kernels._mxfp4_math import e2m1_to_f32, e8m0_to_f32

DEFAULT_BLOCK_G = 128


@triton.jit
def _mxfp4_dequant_kernel(blocks_ptr, scales_ptr, out_ptr, n_blocks, BLOCK_G: tl.constexpr, BF16_BITS: tl.constexpr):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    in_range = g < n_blocks
    packed = tl.load(blocks_ptr + g[:, None] * 16 + tl.arange(0, 16)[None, :], mask=in_range[:, None],
                     other=0).to(tl.int32)
    scale = e8m0_to_f32(tl.load(scales_ptr + g, mask=in_range, other=127).to(tl.int32))
    # Byte j holds element 2j (low nibble) and 2j+1 (high nibble): interleave to the [BLOCK_G, 32] row order,
    # so one contiguous, vectorisable store writes the whole tile.
    codes = tl.interleave(packed & 15, packed >> 4)
    values = e2m1_to_f32(codes) * scale[:, None]
    if BF16_BITS:
        # Decoded values have at most 2 significant bits, so the upper half of the fp32 pattern IS the
        # bf16 value (subnormals, Inf and NaN included). A bit shift also sidesteps the interpreter's
        # fp32->bf16 conversion, which flushes subnormals.
        values = (values.to(tl.int32, bitcast=True) >> 16).to(tl.int16)
    tl.store(out_ptr + g[:, None] * 32 + tl.arange(0, 32)[None, :], values, mask=in_range[:, None])


def mxfp4_dequant_triton(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, block_g: int = DEFAULT_BLOCK_G) -> None:
    """Decode contiguous ``blocks`` uint8 ``[..., G, 16]`` / ``scales`` uint8 ``[..., G]`` into ``out``.

    Parameters
    ----------
    blocks, scales : torch.Tensor
        Contiguous uint8 inputs (validated by :func:`lazarus_core.ops.mxfp4_dequant`).
    out : torch.Tensor
        Contiguous fp32 or bf16 ``[..., G * 32]``, written in place.
    block_g : int
        Blocks per program (a power of two).
    """
    n_blocks = scales.numel()
    grid = (triton.cdiv(n_blocks, block_g),)
    bf16 = out.dtype == torch.bfloat16
    target = out.view(torch.int16) if bf16 else out
    _mxfp4_dequant_kernel[grid](blocks, scales, target, n_blocks, BLOCK_G=block_g, BF16_BITS=bf16)
