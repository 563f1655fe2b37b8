// Why: MXFP4 -> fp32/bf16 on the CPU at memory speed: OpenMP over blocks, an AVX2 path chosen at
// run time (the wheel itself is built for baseline x86-64), and a portable path that uses the shared
// host/device arithmetic of mxfp4_codec.h.
#include "mxfp4_dequant/mxfp4_dequant.h"

#include <algorithm>

#include "common/cpu_kernels.h"
#include "common/mxfp4_codec.h"
#include "common/mxfp4_simd.h"

namespace lazarus {
namespace {

using mxfp4::kBytesPerBlock;
using mxfp4::kValuesPerBlock;

// bf16 bits of decoded values as the CUDA kernels write them (the shared exact upper-half rule).
struct DecodedBf16Sink {
  uint16_t* out;
  void store(int64_t i, float v) const { out[i] = mxfp4::decoded_to_bf16_bits(v); }
};

// Blocks per OpenMP work item: 64 KiB of fp32 output, large enough to amortise scheduling.
constexpr int64_t kChunkBlocks = 512;

template <typename Sink>
void decode_range_portable(const uint8_t* blocks, const uint8_t* scales, int64_t begin, int64_t end, Sink sink) {
  for (int64_t b = begin; b < end; ++b) {
    const float scale = mxfp4::e8m0_to_float(scales[b]);
    const uint8_t* bytes = blocks + b * kBytesPerBlock;
    const int64_t base = b * kValuesPerBlock;
    for (int j = 0; j < kBytesPerBlock; ++j) {
      float lo, hi;
      mxfp4::decode_byte(bytes[j], scale, &lo, &hi);
      sink.store(base + 2 * j, lo);
      sink.store(base + 2 * j + 1, hi);
    }
  }
}

#if defined(LAZARUS_X86)
// Large outputs do not stay in cache anyway: when `streaming` (and 32-byte aligned), non-temporal
// stores skip the read-for-ownership of every destination line (about a third of the traffic).
__attribute__((target("avx2"))) void decode_range_f32_avx2(const uint8_t* blocks, const uint8_t* scales,
                                                           int64_t begin, int64_t end, float* out, bool streaming) {
  const bool aligned = streaming && (reinterpret_cast<uintptr_t>(out) % 32) == 0;
  for (int64_t b = begin; b < end; ++b) {
    __m256 v[4];
    mxfp4::decode_block_avx2(blocks + b * kBytesPerBlock, mxfp4::e8m0_to_float(scales[b]), v);
    float* dst = out + b * kValuesPerBlock;
    if (aligned) {
      for (int q = 0; q < 4; ++q) _mm256_stream_ps(dst + 8 * q, v[q]);
    } else {
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(dst + 8 * q, v[q]);
    }
  }
  _mm_sfence();
}

__attribute__((target("avx2"))) void decode_range_bf16_avx2(const uint8_t* blocks, const uint8_t* scales,
                                                            int64_t begin, int64_t end, uint16_t* out,
                                                            bool streaming) {
  const bool aligned = streaming && (reinterpret_cast<uintptr_t>(out) % 32) == 0;
  for (int64_t b = begin; b < end; ++b) {
    __m256 v[4];
    mxfp4::decode_block_avx2(blocks + b * kBytesPerBlock, mxfp4::e8m0_to_float(scales[b]), v);
    uint16_t* dst = out + b * kValuesPerBlock;
    for (int q = 0; q < 4; q += 2) {
      // Decoded values have at most 2 significant bits, so the upper half of each fp32 IS the bf16
      // value (NaN and Inf included): a shift, no rounding.
      const __m256i a = _mm256_srli_epi32(_mm256_castps_si256(v[q]), 16);
      const __m256i c = _mm256_srli_epi32(_mm256_castps_si256(v[q + 1]), 16);
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, c), 0xD8);
      if (aligned) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 8 * q), packed);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 8 * q), packed);
      }
    }
  }
  _mm_sfence();
}

// Outputs at least this large bypass the cache (they exceed the last-level cache of common CPUs).
constexpr int64_t kStreamingBytes = int64_t{32} << 20;

#endif

template <typename RangeFn>
void parallel_over_blocks(int64_t n_blocks, RangeFn fn) {
  parallel_for_chunks(n_blocks, kChunkBlocks, fn);
}

}  // namespace

void mxfp4_dequant_f32_cpu(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float* out) {
#if defined(LAZARUS_X86)
  if (mxfp4::cpu_has_avx2()) {
    const bool streaming = n_blocks * kValuesPerBlock * int64_t{4} >= kStreamingBytes;
    parallel_over_blocks(n_blocks, [&](int64_t b, int64_t e) { decode_range_f32_avx2(blocks, scales, b, e, out, streaming); });
    return;
  }
#endif
  parallel_over_blocks(n_blocks, [&](int64_t b, int64_t e) { decode_range_portable(blocks, scales, b, e, F32Sink{out}); });
}

void mxfp4_dequant_bf16_cpu(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, uint16_t* out) {
#if defined(LAZARUS_X86)
  if (mxfp4::cpu_has_avx2()) {
    const bool streaming = n_blocks * kValuesPerBlock * int64_t{2} >= kStreamingBytes;
    parallel_over_blocks(n_blocks, [&](int64_t b, int64_t e) { decode_range_bf16_avx2(blocks, scales, b, e, out, streaming); });
    return;
  }
#endif
  parallel_over_blocks(n_blocks, [&](int64_t b, int64_t e) { decode_range_portable(blocks, scales, b, e, DecodedBf16Sink{out}); });
}

namespace detail {
// The portable path, exposed so tests can check it on a machine that has AVX2.
void mxfp4_dequant_f32_portable(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float* out) {
  parallel_over_blocks(n_blocks, [&](int64_t b, int64_t e) { decode_range_portable(blocks, scales, b, e, F32Sink{out}); });
}
void mxfp4_dequant_bf16_portable(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, uint16_t* out) {
  parallel_over_blocks(n_blocks, [&](int64_t b, int64_t e) { decode_range_portable(blocks, scales, b, e, DecodedBf16Sink{out}); });
}
}  // namespace detail

}  // namespace lazarus
