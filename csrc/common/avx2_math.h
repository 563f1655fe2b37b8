// Why: the AVX2 pieces several CPU kernels share (exp, loads of stored bf16/fp16, horizontal sums), written
// once. Functions carry target attributes: callers check the CPU at run time (cpu_has_avx2_fma_f16c) first.
#pragma once

#include <atomic>
#include <cstdint>

#include "common/float_bits.h"

#if defined(__x86_64__) || defined(_M_X64)
#define LAZARUS_AVX2_MATH 1
#include <immintrin.h>

#define LZ_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// AVX2 plus AVX-VNNI (vpdpbusd: four u8 x s8 products summed into each int32 lane, Alder Lake / Sapphire Rapids on).
#define LZ_TARGET_AVX_VNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
// AVX-512 with VNNI (zmm vpdpbusd: 64 u8 x s8 products per instruction; Ice Lake / Sapphire Rapids servers on).
#define LZ_TARGET_AVX512_VNNI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
// AVX-512 VNNI plus VBMI (vpermb: a byte lookup in a 64-entry table; Ice Lake and AMD Zen 4 on, not Cascade Lake).
#define LZ_TARGET_AVX512_VBMI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi")))

namespace lazarus {
namespace simd {

inline bool cpu_has_avx2_fma_f16c() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

inline bool cpu_has_avx_vnni() {
  static const bool has = cpu_has_avx2_fma_f16c() && __builtin_cpu_supports("avxvnni");
  return has;
}

inline bool cpu_has_avx512_vnni() {
  static const bool has = cpu_has_avx2_fma_f16c() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return has;
}

inline bool cpu_has_avx512_vbmi() {
  static const bool has = cpu_has_avx512_vnni() && __builtin_cpu_supports("avx512vbmi");
  return has;
}

// A ymm vpdpbusd runs: AVX-VNNI (VEX encoding) or AVX-512 VNNI + VL (EVEX; AMD Zen 4 and Intel Ice Lake have this
// and not AVX-VNNI).
inline bool cpu_has_ymm_vnni() { return cpu_has_avx_vnni() || cpu_has_avx512_vnni(); }

// exp(x) for 8 floats (Cephes expf: range reduction by ln 2, degree-5 polynomial; about 2e-7 relative).
// x < -87.3 and NaN give 0; x above 88.3 gives exp(88.3) (finite), so 1 / (1 + exp(-x)) never divides by Inf.
LZ_TARGET_AVX2 inline __m256 exp_avx2(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2)), underflow);
}

// exp_avx2 on 16 lanes: the same operations in the same order per lane, so the same bits.
LZ_TARGET_AVX512_VNNI inline __m512 exp_zmm(__m512 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i pow2 = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(underflow, _mm512_mul_ps(y, _mm512_castsi512_ps(pow2)));
}

// 8 consecutive stored values -> fp32 (exact): fp32, bf16 (bits shifted into the high half), fp16 (F16C).
LZ_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

LZ_TARGET_AVX2 inline __m256 load8(const bf16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

LZ_TARGET_AVX2 inline __m256 load8(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 16 consecutive stored values -> fp32 in a zmm (exact), as load8 does 8 (callers check use_avx512_vnni()).
LZ_TARGET_AVX512_VNNI inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

LZ_TARGET_AVX512_VNNI inline __m512 load16(const bf16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

LZ_TARGET_AVX512_VNNI inline __m512 load16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

LZ_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace simd
}  // namespace lazarus
#endif

namespace lazarus {
// True when this CPU runs the AVX2/FMA/F16C kernels (always false where they are not compiled).
inline bool use_avx2() {
#if defined(LAZARUS_AVX2_MATH)
  return simd::cpu_has_avx2_fma_f16c();
#else
  return false;
#endif
}

// Whether kernels with an AVX-VNNI form may run it (default true): switched off, they run their AVX2 form, so
// tests and benchmarks compare both on one machine. Read at each kernel call; do not flip it while one runs.
inline std::atomic<bool>& avx_vnni_allowed() {
  static std::atomic<bool> allowed{true};
  return allowed;
}

// True when the AVX-VNNI forms run: compiled, on this CPU, and allowed.
inline bool use_avx_vnni() {
#if defined(LAZARUS_AVX2_MATH)
  return simd::cpu_has_avx_vnni() && avx_vnni_allowed().load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// True when a ymm vpdpbusd form may run: on this CPU (simd::cpu_has_ymm_vnni) and allowed as the AVX-VNNI forms are.
inline bool use_ymm_vnni() {
#if defined(LAZARUS_AVX2_MATH)
  return simd::cpu_has_ymm_vnni() && avx_vnni_allowed().load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// Whether kernels with an AVX-512 VNNI form may run it (default true), as avx_vnni_allowed.
inline std::atomic<bool>& avx512_vnni_allowed() {
  static std::atomic<bool> allowed{true};
  return allowed;
}

// True when the AVX-512 VNNI forms run: compiled, on this CPU, and allowed.
inline bool use_avx512_vnni() {
#if defined(LAZARUS_AVX2_MATH)
  return simd::cpu_has_avx512_vnni() && avx512_vnni_allowed().load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// Whether kernels with an AVX-512 VBMI form may run it (default true), as avx_vnni_allowed. Only the zmm forms
// read it: forbidding AVX-512 VNNI (avx512_vnni_allowed) forbids their VBMI forms too.
inline std::atomic<bool>& avx512_vbmi_allowed() {
  static std::atomic<bool> allowed{true};
  return allowed;
}

// True when the AVX-512 VBMI forms of the zmm kernels run (where use_avx512_vnni chose a zmm form): compiled, on
// this CPU, and allowed.
inline bool use_avx512_vbmi() {
#if defined(LAZARUS_AVX2_MATH)
  return simd::cpu_has_avx512_vbmi() && avx512_vbmi_allowed().load(std::memory_order_relaxed);
#else
  return false;
#endif
}
}  // namespace lazarus
