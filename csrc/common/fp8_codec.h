// Why: the FP8 E4M3 (the "fn" variant used by DeepSeek-V3: no Inf, NaN = S.1111.111) decoding
// arithmetic, written once as host/device code so the CPU tests check what the CUDA kernel computes.
#pragma once

#include <cstdint>

#include "float_bits.h"

namespace lazarus {
namespace fp8 {

constexpr int kE4M3Bias = 7;

// One E4M3FN byte -> its exact fp32 value. Bit 7 sign, bits 6..3 exponent (bias 7), bits 2..0
// mantissa. Exponent 0 is subnormal (m/8 * 2^-6); 0x7F / 0xFF are NaN; there is no Inf; max 448.
LZ_HD float e4m3fn_to_float(uint8_t byte) {
  const uint32_t sign = static_cast<uint32_t>(byte & 0x80u) << 24;
  const uint32_t exponent = (byte >> 3) & 0xFu;
  const uint32_t mantissa = byte & 0x7u;
  if (exponent == 0xFu && mantissa == 0x7u) return bits_to_float(sign | 0x7FC00000u);
  if (exponent == 0u) {
    // Subnormal: m * 2^-9, exact in fp32 (m < 8); the sign is applied as a bit so -0 stays -0.
    const float magnitude = static_cast<float>(mantissa) * bits_to_float(0x3B000000u);  // 2^-9
    return bits_to_float(float_to_bits(magnitude) | sign);
  }
  // Normal: rebias the exponent (7 -> 127) and widen the mantissa (3 -> 23 bits).
  return bits_to_float(sign | ((exponent + 127u - kE4M3Bias) << 23) | (mantissa << 20));
}

}  // namespace fp8
}  // namespace lazarus
