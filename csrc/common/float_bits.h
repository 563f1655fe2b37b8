// Why: bit-exact float helpers shared by the CPU and CUDA kernels, so the CPU tests exercise the
// same arithmetic the GPU runs.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LZ_HD __host__ __device__ __forceinline__
#else
#define LZ_HD inline
#endif

namespace lazarus {

LZ_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

LZ_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// fp32 -> bf16 bits, round to nearest even; NaN stays a quiet NaN with its sign.
LZ_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t bits = float_to_bits(f);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0u) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

LZ_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE binary16 bits -> fp32 (exact). Exponent and mantissa are moved into fp32 position and rescaled by
// 2^112 (the bias difference), which also normalises subnormals; Inf/NaN (exponent 31) are rebuilt.
LZ_HD float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t magnitude = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  if ((h & 0x7C00u) == 0x7C00u) return bits_to_float(sign | 0x7F800000u | magnitude);
  return bits_to_float(float_to_bits(bits_to_float(magnitude) * 5.192296858534828e33f) | sign);  // * 2^112
}

// How a weight tensor is stored (the tags the CPU kernels are templated on).
enum class Storage : int { kF32 = 0, kBF16 = 1, kF16 = 2, kMXFP4 = 3 };
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

LZ_HD float to_float(float v) { return v; }
LZ_HD float to_float(bf16_t v) { return bf16_bits_to_float(v.bits); }
LZ_HD float to_float(f16_t v) { return f16_bits_to_float(v.bits); }

}  // namespace lazarus
