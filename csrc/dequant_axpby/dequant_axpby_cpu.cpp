// Why: fused decode + axpby on the CPU: OpenMP over chunks, AVX2 chosen at run time for MXFP4, and
// plain loops (that the compiler vectorises for baseline x86-64) for bf16.
#include "dequant_axpby/dequant_axpby.h"

#include <algorithm>

#include "common/cpu_kernels.h"
#include "common/float_bits.h"
#include "common/mxfp4_codec.h"
#include "common/mxfp4_simd.h"

namespace lazarus {
namespace {

constexpr int64_t kChunkBlocks = 512;
constexpr int64_t kChunkValues = 16384;

void mxfp4_axpby_portable(const uint8_t* blocks, const uint8_t* scales, int64_t begin, int64_t end, float alpha,
                          const float* y, float beta, float* out) {
  for (int64_t b = begin; b < end; ++b) {
    const float scale = mxfp4::e8m0_to_float(scales[b]);
    for (int j = 0; j < mxfp4::kBytesPerBlock; ++j) {
      float lo, hi;
      mxfp4::decode_byte(blocks[b * mxfp4::kBytesPerBlock + j], scale, &lo, &hi);
      const int64_t i = b * mxfp4::kValuesPerBlock + 2 * j;
      out[i] = alpha * lo + beta * y[i];
      out[i + 1] = alpha * hi + beta * y[i + 1];
    }
  }
}

#if defined(LAZARUS_X86)
__attribute__((target("avx2"))) void mxfp4_axpby_avx2(const uint8_t* blocks, const uint8_t* scales, int64_t begin,
                                                      int64_t end, float alpha, const float* y, float beta, float* out) {
  const __m256 va = _mm256_set1_ps(alpha);
  const __m256 vb = _mm256_set1_ps(beta);
  for (int64_t b = begin; b < end; ++b) {
    __m256 v[4];
    mxfp4::decode_block_avx2(blocks + b * mxfp4::kBytesPerBlock, mxfp4::e8m0_to_float(scales[b]), v);
    const int64_t base = b * mxfp4::kValuesPerBlock;
    for (int q = 0; q < 4; ++q) {
      // Two roundings (no FMA), exactly like the portable path and the torch reference.
      const __m256 r = _mm256_add_ps(_mm256_mul_ps(va, v[q]), _mm256_mul_ps(vb, _mm256_loadu_ps(y + base + 8 * q)));
      _mm256_storeu_ps(out + base + 8 * q, r);
    }
  }
}
#endif

}  // namespace

void mxfp4_axpby_cpu(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float alpha, const float* y,
                     float beta, float* out) {
#if defined(LAZARUS_X86)
  if (mxfp4::cpu_has_avx2()) {
    parallel_for_chunks(n_blocks, kChunkBlocks,
                    [&](int64_t b, int64_t e) { mxfp4_axpby_avx2(blocks, scales, b, e, alpha, y, beta, out); });
    return;
  }
#endif
  parallel_for_chunks(n_blocks, kChunkBlocks,
                  [&](int64_t b, int64_t e) { mxfp4_axpby_portable(blocks, scales, b, e, alpha, y, beta, out); });
}

void bf16_axpby_cpu(const uint16_t* src, int64_t n, float alpha, const float* y, float beta, float* out) {
  parallel_for_chunks(n, kChunkValues, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = alpha * bf16_bits_to_float(src[i]) + beta * y[i];
  });
}

namespace detail {
void mxfp4_axpby_portable_cpu(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float alpha,
                              const float* y, float beta, float* out) {
  parallel_for_chunks(n_blocks, kChunkBlocks,
                  [&](int64_t b, int64_t e) { mxfp4_axpby_portable(blocks, scales, b, e, alpha, y, beta, out); });
}
}  // namespace detail

}  // namespace lazarus
