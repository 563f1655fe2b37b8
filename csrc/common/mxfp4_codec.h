// Why: the MXFP4 (OCP microscaling, E2M1 elements + E8M0 block scale) arithmetic, written once as
// host/device code. The CPU kernels call it, so the CPU tests check what the CUDA kernels compute.
#pragma once

#include <cstdint>

#include "float_bits.h"

namespace lazarus {
namespace mxfp4 {

constexpr int kValuesPerBlock = 32;
constexpr int kBytesPerBlock = 16;
constexpr uint8_t kNanScale = 0xFF;

// |E2M1| for the 3 magnitude bits: 0, 0.5, 1, 1.5, 2, 3, 4, 6 (bit 3 of a code is the sign).
LZ_HD float e2m1_magnitude(uint32_t magnitude_bits) {
  // e = exponent field (2 bits), m = mantissa bit. e == 0 is the subnormal 0 / 0.5.
  const uint32_t e = (magnitude_bits >> 1) & 3u;
  const uint32_t m = magnitude_bits & 1u;
  if (e == 0u) return 0.5f * static_cast<float>(m);
  return static_cast<float>(1u << (e - 1u)) * (1.0f + 0.5f * static_cast<float>(m));
}

// One 4-bit code -> its value (sign from bit 3; code 8 is -0.0).
LZ_HD float e2m1_to_float(uint32_t code) {
  const float mag = e2m1_magnitude(code & 7u);
  return (code & 8u) ? -mag : mag;
}

// E8M0 scale byte -> 2^(s-127) as an fp32 bit pattern. s = 0xFF is NaN; s = 0 is the subnormal
// 2^-127 (never flushed to zero).
LZ_HD float e8m0_to_float(uint8_t s) {
  if (s == kNanScale) return bits_to_float(0x7FC00000u);
  if (s == 0) return bits_to_float(0x00400000u);
  return bits_to_float(static_cast<uint32_t>(s) << 23);
}

// A decoded MXFP4 value -> its bf16 bits. Decoded values have at most 2 significant bits, so the upper half
// of the fp32 pattern IS the bf16 value (subnormals, Inf and NaN included): no rounding step.
LZ_HD uint16_t decoded_to_bf16_bits(float v) { return static_cast<uint16_t>(float_to_bits(v) >> 16); }

// Decode one packed byte: element 2j in the low nibble, element 2j+1 in the high nibble.
LZ_HD void decode_byte(uint8_t byte, float scale, float* lo, float* hi) {
  *lo = e2m1_to_float(byte & 0xFu) * scale;
  *hi = e2m1_to_float(byte >> 4) * scale;
}

// Scale exponent e for a block with max |value| amax > 0: the smallest e (clamped to
// [-127, 127]) with amax <= 6 * 2^e, so no element of the block clips.
LZ_HD int scale_exponent(float amax) {
  int e = -127;
  // Start from the float exponent of amax/6 and correct by at most one step either way; the
  // comparisons use exact power-of-two scaling, so no rounding of amax/6 can cause a clip.
  uint32_t bits = float_to_bits(amax / 6.0f);
  int biased = static_cast<int>((bits >> 23) & 0xFFu);
  if (biased > 0) e = biased - 127;
  if (e < -127) e = -127;
  while (e < 127 && amax > 6.0f * e8m0_to_float(static_cast<uint8_t>(e + 127))) ++e;
  while (e > -127 && amax <= 6.0f * e8m0_to_float(static_cast<uint8_t>(e - 1 + 127))) --e;
  return e;
}

// Round |x| <= 6 (already divided by the block scale) to the nearest E2M1 magnitude code, ties to
// the even code; values above 6 saturate at 6. Returns the 3 magnitude bits.
LZ_HD uint32_t round_to_e2m1_magnitude(float ax) {
  // Midpoints between neighbouring magnitudes; a tie goes up only when the upper code is even.
  return static_cast<uint32_t>(ax > 0.25f) + static_cast<uint32_t>(ax >= 0.75f) +
         static_cast<uint32_t>(ax > 1.25f) + static_cast<uint32_t>(ax >= 1.75f) +
         static_cast<uint32_t>(ax > 2.5f) + static_cast<uint32_t>(ax >= 3.5f) +
         static_cast<uint32_t>(ax > 5.0f);
}

// Encode one value already divided by its block scale: sign bit from the input's sign bit.
LZ_HD uint32_t encode_scaled(float x) {
  const uint32_t sign = (float_to_bits(x) >> 31) << 3;
  const float ax = x < 0.0f ? -x : x;
  return sign | round_to_e2m1_magnitude(ax);
}

}  // namespace mxfp4
}  // namespace lazarus
