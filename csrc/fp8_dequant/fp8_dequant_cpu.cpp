// Why: block-scaled FP8 E4M3 -> fp32/bf16 on the CPU: OpenMP over rows; an AVX2 path (chosen at run
// time) decodes 8 bytes at once with integer arithmetic; the portable path uses a 256-entry table built
// from the shared host/device codec. Both multiply by the block scale once per element, so they agree bit
// for bit.
#include "fp8_dequant/fp8_dequant.h"

#include <algorithm>
#include <array>

#include "common/cpu_kernels.h"
#include "common/fp8_codec.h"

#if defined(__x86_64__) || defined(_M_X64)
#define LAZARUS_X86 1
#include <immintrin.h>
#endif

namespace lazarus {
namespace {

const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = fp8::e4m3fn_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

// Decodes row `gr` (columns [c0, c1) share one scale) with the portable table.
template <typename Sink>
void decode_span_portable(const uint8_t* src, int64_t base, int64_t c0, int64_t c1, float scale, Sink sink) {
  const std::array<float, 256>& table = e4m3_table();
  for (int64_t c = c0; c < c1; ++c) sink.store(base + c, table[src[c]] * scale);
}

#if defined(LAZARUS_X86)
// 8 E4M3FN bytes -> 8 fp32, arithmetic as in fp8_codec.h: normals rebias the exponent, subnormals are
// m * 2^-9, S.1111.111 is NaN; the sign is OR-ed in last so -0 stays -0.
__attribute__((target("avx2"))) inline __m256 decode8_avx2(const uint8_t* src) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  const __m256i em = _mm256_and_si256(b, _mm256_set1_epi32(0x7F));
  const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23));
  const __m256i subnormal =
      _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(1.0f / 512.0f)));
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), em);
  const __m256i is_nan = _mm256_cmpeq_epi32(em, _mm256_set1_epi32(0x7F));
  __m256i bits = _mm256_blendv_epi8(normal, subnormal, is_sub);
  bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC00000), is_nan);
  return _mm256_castsi256_ps(_mm256_or_si256(bits, sign));
}

// fp32 -> bf16 bits, round to nearest even, NaN -> quiet NaN (as float_to_bf16_bits), 8 lanes.
__attribute__((target("avx2"))) inline __m256i to_bf16_bits_avx2(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, quiet, is_nan);
}

__attribute__((target("avx2"))) void decode_span_f32_avx2(const uint8_t* src, float* dst, int64_t c0, int64_t c1,
                                                          float scale_f) {
  const __m256 scale = _mm256_set1_ps(scale_f);
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) _mm256_storeu_ps(dst + c, _mm256_mul_ps(decode8_avx2(src + c), scale));
  decode_span_portable(src, 0, c, c1, scale_f, F32Sink{dst});
}

__attribute__((target("avx2"))) void decode_span_bf16_avx2(const uint8_t* src, uint16_t* dst, int64_t c0, int64_t c1,
                                                           float scale_f) {
  const __m256 scale = _mm256_set1_ps(scale_f);
  int64_t c = c0;
  for (; c + 16 <= c1; c += 16) {
    const __m256i a = to_bf16_bits_avx2(_mm256_mul_ps(decode8_avx2(src + c), scale));
    const __m256i b = to_bf16_bits_avx2(_mm256_mul_ps(decode8_avx2(src + c + 8), scale));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), packed);
  }
  decode_span_portable(src, 0, c, c1, scale_f, Bf16Sink{dst});
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

// Calls span(src_row, row_index, c0, c1, scale) for every (row, scale block) in parallel over rows.
template <typename SpanFn>
void for_each_span(const uint8_t* weight, const float* scale_inv, Fp8BlockShape s, SpanFn span) {
  const int64_t scale_rows = (s.rows + s.block_rows - 1) / s.block_rows;
  const int64_t scale_cols = (s.cols + s.block_cols - 1) / s.block_cols;
  const int64_t total_rows = s.batch * s.rows;
#pragma omp parallel for schedule(static) if (total_rows * s.cols > (1 << 16))
  for (int64_t gr = 0; gr < total_rows; ++gr) {
    const int64_t b = gr / s.rows;
    const int64_t r = gr % s.rows;
    const float* scale_row = scale_inv + (b * scale_rows + r / s.block_rows) * scale_cols;
    for (int64_t c0 = 0; c0 < s.cols; c0 += s.block_cols) {
      span(weight + gr * s.cols, gr, c0, std::min(s.cols, c0 + s.block_cols), scale_row[c0 / s.block_cols]);
    }
  }
}

}  // namespace

void fp8_dequant_f32_cpu(const uint8_t* weight, const float* scale_inv, Fp8BlockShape s, float* out) {
#if defined(LAZARUS_X86)
  if (cpu_has_avx2()) {
    for_each_span(weight, scale_inv, s, [&](const uint8_t* src, int64_t gr, int64_t c0, int64_t c1, float scale) {
      decode_span_f32_avx2(src, out + gr * s.cols, c0, c1, scale);
    });
    return;
  }
#endif
  for_each_span(weight, scale_inv, s, [&](const uint8_t* src, int64_t gr, int64_t c0, int64_t c1, float scale) {
    decode_span_portable(src, gr * s.cols, c0, c1, scale, F32Sink{out});
  });
}

void fp8_dequant_bf16_cpu(const uint8_t* weight, const float* scale_inv, Fp8BlockShape s, uint16_t* out) {
#if defined(LAZARUS_X86)
  if (cpu_has_avx2()) {
    for_each_span(weight, scale_inv, s, [&](const uint8_t* src, int64_t gr, int64_t c0, int64_t c1, float scale) {
      decode_span_bf16_avx2(src, out + gr * s.cols, c0, c1, scale);
    });
    return;
  }
#endif
  for_each_span(weight, scale_inv, s, [&](const uint8_t* src, int64_t gr, int64_t c0, int64_t c1, float scale) {
    decode_span_portable(src, gr * s.cols, c0, c1, scale, Bf16Sink{out});
  });
}

namespace detail {
void fp8_dequant_f32_portable(const uint8_t* weight, const float* scale_inv, Fp8BlockShape s, float* out) {
  for_each_span(weight, scale_inv, s, [&](const uint8_t* src, int64_t gr, int64_t c0, int64_t c1, float scale) {
    decode_span_portable(src, gr * s.cols, c0, c1, scale, F32Sink{out});
  });
}
void fp8_dequant_bf16_portable(const uint8_t* weight, const float* scale_inv, Fp8BlockShape s, uint16_t* out) {
  for_each_span(weight, scale_inv, s, [&](const uint8_t* src, int64_t gr, int64_t c0, int64_t c1, float scale) {
    decode_span_portable(src, gr * s.cols, c0, c1, scale, Bf16Sink{out});
  });
}
}  // namespace detail

}  // namespace lazarus
