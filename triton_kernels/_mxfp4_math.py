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
    """4-bit E2M1 code (int32 tensor) -> fp32 value; bit 3 is the sign."""
    magnitude_bits = code & 7
    exponent = magnitude_bits >> 1
    mantissa = (magnitude_bits & 1).to(tl.float32)
    normal = (1 << tl.maximum(exponent - 1, 0)).to(tl.float32) * (1.0 + 0.5 * mantissa)
    magnitude = tl.where(exponent == 0, 0.5 * mantissa, normal)
    return tl.where((code & 8) != 0, -magnitude, magnitude)


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
