// Why: how the integer MXFP4 kernels round one 32-element block of a token row (kTokensFixed16 / kTokensInt8 of
// overlay_moe.h), written once for the matrix-vector kernel (stored_matvec_cpu.cpp) and the many-token GEMM
// (mxfp4_gemm_cpu.cpp), so both multiply the same integers. Internal to the CPU kernels.
// Per block with largest |x| = m:
// - kFixed16: k = 6 - e where m = f * 2^e, f in [0.5, 1) (k = 0 for an all-zero block, at most kMaxShift = 140,
//   so that the half scale 2^-(k+9) stays an fp32 subnormal), so |x| * 2^k < 64; N = round(x * 2^(k+8)) (|N| <=
//   16384), carried as two int8 terms N = 256 * hi + lo, hi = floor((N + 128) / 256) in [-64, 64], lo in [-128,
//   127]; the block's scale is 2^-(k+8). Each element is off by at most 2^-14 of m (2^-149 when m < 2^-135).
// - kInt8: scale d = m / 127 (fp32), q = round(x / d) in [-127, 127]; each element off by at most m / 254.
// The kernels' code table holds 2 * E2M1 + kCodeOffset as uint8, so each block's sum carries kCodeOffset times
// the sum of its token integers, which they subtract exactly.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/avx2_math.h"
#include "overlay_moe/overlay_moe.h"

namespace lazarus {
namespace q8 {

constexpr int kCodeOffset = 12;
constexpr int kMaxShift = 140;

// One block's integer values n[32] (N in kFixed16, q in kInt8) and its half scale; false when it holds inf or
// NaN. The portable form; quantize_block_avx2 computes the same values.
inline bool quantize_block(const float* xb, int mode, int32_t* n, float* half_scale) {
  float m = 0.0f;
  for (int i = 0; i < 32; ++i) m = std::max(m, std::fabs(xb[i]));
  if (!std::isfinite(m)) return false;
  for (int i = 0; i < 32; ++i)
    if (!std::isfinite(xb[i])) return false;
  if (mode == kTokensFixed16) {
    int e = 0;
    std::frexp(m, &e);
    const int k = m > 0.0f ? std::min(kMaxShift, 6 - e) : 0;
    *half_scale = std::ldexp(1.0f, -(k + 8) - 1);
    for (int i = 0; i < 32; ++i) n[i] = static_cast<int32_t>(std::nearbyint(std::ldexp(xb[i], k + 8)));
  } else {
    const float d = m / 127.0f;
    *half_scale = 0.5f * d;
    for (int i = 0; i < 32; ++i) {
      const float v = d > 0.0f ? std::nearbyint(xb[i] / d) : 0.0f;
      n[i] = static_cast<int32_t>(std::max(-127.0f, std::min(127.0f, v)));
    }
  }
  return true;
}

#if defined(LAZARUS_AVX2_MATH)
// quantize_block with the per-element arithmetic in registers (the same IEEE operations, so the same values).
// Blocks whose scaling 2^(k+8) is not a normal fp32 (largest |x| below 2^-114) take the portable form.
LZ_TARGET_AVX2 inline bool quantize_block_avx2(const float* xb, int mode, int32_t* n, float* half_scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
  __m256 v[4], mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(xb + 8 * j);
    const __m256 a = _mm256_andnot_ps(sign, v[j]);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // |x| >= inf, or NaN
    mx = _mm256_max_ps(mx, a);
  }
  if (_mm256_movemask_ps(bad)) return false;
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  __m256 mul;
  if (mode == kTokensFixed16) {
    int e = 0;
    std::frexp(m, &e);
    const int k = m > 0.0f ? std::min(kMaxShift, 6 - e) : 0;
    if (k + 8 > 127) return quantize_block(xb, mode, n, half_scale);
    *half_scale = std::ldexp(1.0f, -(k + 8) - 1);
    mul = _mm256_set1_ps(std::ldexp(1.0f, k + 8));
    for (int j = 0; j < 4; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(n + 8 * j), _mm256_cvtps_epi32(_mm256_mul_ps(v[j], mul)));
  } else {
    const float d = m / 127.0f;
    *half_scale = 0.5f * d;
    const __m256 dv = _mm256_set1_ps(d), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    for (int j = 0; j < 4; ++j) {
      const __m256 q = d > 0.0f ? _mm256_round_ps(_mm256_div_ps(v[j], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                : _mm256_setzero_ps();
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(n + 8 * j),
                          _mm256_cvtps_epi32(_mm256_max_ps(lo, _mm256_min_ps(hi, q))));
    }
  }
  return true;
}
#endif


// The block quantiser this build and CPU run (the same values either way).
inline bool quantize_block_fast(const float* xb, int mode, int32_t* n, float* half_scale) {
#if defined(LAZARUS_AVX2_MATH)
  if (use_avx2()) return quantize_block_avx2(xb, mode, n, half_scale);
#endif
  return quantize_block(xb, mode, n, half_scale);
}

}  // namespace q8
}  // namespace lazarus
