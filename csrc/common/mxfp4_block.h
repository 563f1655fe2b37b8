// Why: one MXFP4 block (32 values) quantised in host/device code, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "mxfp4_codec.h"

namespace lazarus {
namespace mxfp4 {

// Quantise 32 finite values (`w`) into 16 packed bytes and returns the scale byte.
LZ_HD uint8_t quantize_block(const float* w, uint8_t* packed) {
  float amax = 0.0f;
  for (int i = 0; i < kValuesPerBlock; ++i) {
    const float a = w[i] < 0.0f ? -w[i] : w[i];
    amax = a > amax ? a : amax;
  }
  // An all-zero block gets e = -127 (scale byte 0); its codes keep each value's sign bit.
  const int e = scale_exponent(amax);
  const float inv_scale = e8m0_to_float(static_cast<uint8_t>(127 - e));  // 2^-e, exact
  for (int j = 0; j < kBytesPerBlock; ++j) {
    const uint32_t lo = encode_scaled(w[2 * j] * inv_scale);
    const uint32_t hi = encode_scaled(w[2 * j + 1] * inv_scale);
    packed[j] = static_cast<uint8_t>(lo | (hi << 4));
  }
  return static_cast<uint8_t>(e + 127);
}

}  // namespace mxfp4
}  // namespace lazarus
