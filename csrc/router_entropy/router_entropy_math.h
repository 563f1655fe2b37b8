// Why: the per-element and per-row arithmetic of router entropy shared by the CPU portable path and
// the CUDA kernel (so the CPU tests check what the GPU runs).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/float_bits.h"

namespace lazarus {
namespace router_entropy {

// IEEE binary16 bits -> fp32 (subnormals, Inf and NaN included).
LZ_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // m * 2^-24
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)), finite for every finite x; -inf at -inf, 0 at +inf.
LZ_HD float log_sigmoid(float x) {
  return fminf(x, 0.0f) - log1pf(expf(-fabsf(x)));
}

// y_j: the log of the unnormalised probability.
LZ_HD float log_weight(float x, bool sigmoid) { return sigmoid ? log_sigmoid(x) : x; }

// e * d with 0 * (-inf) = 0 (an expert with zero probability adds nothing to the entropy sum).
LZ_HD float weighted_shift(float e, float d) { return e > 0.0f ? e * d : 0.0f; }

// Entropy from Z = sum exp(d_j) and S = sum exp(d_j) d_j, d_j = y_j - max y.
LZ_HD float entropy_from_sums(float z, float s) { return logf(z) - s / z; }

}  // namespace router_entropy
}  // namespace lazarus
