// Why: the AVX2 decode of one MXFP4 block, shared by every CPU kernel that reads MXFP4 (compiled
// with a target attribute, so callers must check the CPU at run time before using it).
#pragma once

#include <cstdint>

#include "mxfp4_codec.h"

#if defined(__x86_64__) || defined(_M_X64)
#define LAZARUS_X86 1
#include <immintrin.h>

namespace lazarus {
namespace mxfp4 {

// Decodes the 32 codes of one block into four vectors of 8 fp32 values (in element order).
__attribute__((target("avx2"))) inline void decode_block_avx2(const uint8_t* bytes, float scale_f, __m256 v[4]) {
  const __m256 magnitudes = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i lo = _mm_and_si128(packed, low_mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_mask);
  // Interleave so byte i of codes[k] is element 16k + i.
  const __m128i codes[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
  const __m256 scale = _mm256_set1_ps(scale_f);
  const __m256i sign_bit = _mm256_set1_epi32(8);
  for (int k = 0; k < 2; ++k) {
    const __m256i idx[2] = {_mm256_cvtepu8_epi32(codes[k]), _mm256_cvtepu8_epi32(_mm_srli_si128(codes[k], 8))};
    for (int h = 0; h < 2; ++h) {
      // permutevar8x32 reads the low 3 bits (the magnitude); bit 3 becomes the fp32 sign bit.
      const __m256 mag = _mm256_permutevar8x32_ps(magnitudes, idx[h]);
      const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(idx[h], sign_bit), 28);
      v[2 * k + h] = _mm256_mul_ps(_mm256_xor_ps(mag, _mm256_castsi256_ps(sign)), scale);
    }
  }
}


inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

}  // namespace mxfp4
}  // namespace lazarus
#endif
