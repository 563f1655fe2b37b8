"""Block-scaled FP8 E4M3FN -> fp32/bf16 in Triton: each program decodes a BLOCK_R x BLOCK_C tile.

The bytes are loaded as uint8 and decoded with integer arithmetic (the Triton interpreter cannot
load fp8), and bf16 is rounded to nearest even by hand (the interpreter truncates fp32->bf16 stores).
"""

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_R = 32
DEFAULT_BLOCK_C = 128


@triton.jit
def _e4m3fn_to_f32(byte):
    """E4M3FN byte (int32 tensor) -> fp32: bias 7, subnormal m * 2^-9, 0x7F/0xFF NaN, no Inf."""
    sign = (byte & 0x80) << 24
    exponent = (byte >> 3) & 15
    mantissa = byte & 7
    normal = sign | ((exponent + 120) << 23) | (mantissa << 20)
    subnormal = (mantissa.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True) | sign
    bits = tl.where(exponent == 0, subnormal, normal)
    bits = tl.where((exponent == 15) & (mantissa == 7), sign | 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_bits(x):
    """fp32 -> bf16 bit pattern (int16), round to nearest even; NaN stays a quiet NaN."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, (bits >> 16) | 0x40, rounded).to(tl.int16)


@triton.jit
def _fp8_dequant_kernel(weight_ptr, scale_ptr, out_ptr, total_rows, rows, cols, block_rows, block_cols,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BF16_BITS: tl.constexpr,
                        ROW_SCALE: tl.constexpr):
    gr = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # global row
    c0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    row_ok = gr < total_rows
    mask = row_ok[:, None] & (c < cols)[None, :]
    scale_rows = (rows + block_rows - 1) // block_rows
    scale_cols = (cols + block_cols - 1) // block_cols
    scale_row = (gr // rows) * scale_rows + (gr % rows) // block_rows
    if ROW_SCALE:  # the tile lies inside one scale column: one scale per row
        scale = tl.load(scale_ptr + scale_row * scale_cols + c0 // block_cols, mask=row_ok, other=1.0)[:, None]
    else:
        scale = tl.load(scale_ptr + scale_row[:, None] * scale_cols + (c // block_cols)[None, :], mask=mask, other=1.0)
    offsets = gr[:, None] * cols + c[None, :]
    byte = tl.load(weight_ptr + offsets, mask=mask, other=0).to(tl.int32)
    value = _e4m3fn_to_f32(byte) * scale
    if BF16_BITS:
        value = _f32_to_bf16_bits(value)
    tl.store(out_ptr + offsets, value, mask=mask)


def fp8_dequant_triton(weight: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor, batch: int, rows: int,
                       cols: int, block_rows: int, block_cols: int, block_r: int = DEFAULT_BLOCK_R,
                       block_c: int = DEFAULT_BLOCK_C) -> None:
    """Decode contiguous ``weight`` uint8 ``[batch, rows, cols]`` with fp32 ``scale_inv`` into ``out``.

    Parameters
    ----------
    weight : torch.Tensor
        Contiguous uint8 E4M3FN bits, ``batch * rows * cols`` elements (validated by
        :func:`lazarus_core.ops.fp8_dequant`).
    scale_inv : torch.Tensor
        Contiguous fp32 ``[batch, ceil(rows / block_rows), ceil(cols / block_cols)]``.
    out : torch.Tensor
        Contiguous fp32 or bf16 with ``batch * rows * cols`` elements, written in place.
    batch, rows, cols, block_rows, block_cols : int
        Logical shape and scale block size.
    block_r, block_c : int
        Tile per program (powers of two).
    """
    total_rows = batch * rows
    grid = (triton.cdiv(total_rows, block_r), triton.cdiv(cols, block_c))
    bf16 = out.dtype == torch.bfloat16
    target = out.view(torch.int16) if bf16 else out
    _fp8_dequant_kernel[grid](weight, scale_inv, target, total_rows, rows, cols, block_rows, block_cols,
                              BLOCK_R=block_r, BLOCK_C=block_c, BF16_BITS=bf16, ROW_SCALE=block_cols % block_c == 0)
