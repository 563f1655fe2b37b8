"""MXFP4 element and scale arithmetic as Triton device functions, shared by the codec kernels."""

import triton
import triton.language as tl


@triton.jit
def e8m0_to_f32(s):
    """E8M0 byte (int32 tensor) -> 2^(s-127) in fp32; 0xFF -> NaN; 0 -> the subnormal 2^-127."""
    bits = tl.where(s == 0, 0x00400000, s << 23)
    bits = tl.where(s == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e2m1_to_f32(code):
    """4-bit E2M1 code (int32 tensor) -> fp32 value, built bit by bit; bit 3 is the sign.

    Exponent field 0 is the subnormal 0.5 * mantissa, otherwise ``2^(exponent-1) * (1 + mantissa/2)``.
    The sign goes in as a bit, never as ``-x``: Triton lowers float negation to ``0 - x`` on the GPU,
    which loses the sign of zero (code 8 is -0.0).
    """
    exponent = (code >> 1) & 3
    mantissa = code & 1
    normal = ((exponent + 126) << 23) | (mantissa << 22)
    subnormal = mantissa * 0x3F000000                      # 0.5 or +0.0
    magnitude = tl.where(exponent == 0, subnormal, normal)
    return (magnitude | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_e2m1(x):
    """fp32 already divided by its block scale -> 4-bit code: nearest magnitude, ties to even, saturating at 6."""
    ax = tl.abs(x)
    magnitude_bits = (
        (ax > 0.25).to(tl.int32) + (ax >= 0.75).to(tl.int32) + (ax > 1.25).to(tl.int32)
        + (ax >= 1.75).to(tl.int32) + (ax > 2.5).to(tl.int32) + (ax >= 3.5).to(tl.int32)
        + (ax > 5.0).to(tl.int32)
    )
    sign = (x.to(tl.int32, bitcast=True) >> 31) & 1
    return magnitude_bits | (sign << 3)
