// Why: the CPU probes of membench.h (streaming read, non-temporal write and copy, cache flush, u8 x s8 dot rate).
#include "membench/membench.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/stream_prefetch.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LAZARUS_X86 1
#endif

#if defined(LAZARUS_WITH_OPENMP)
#include <omp.h>
#endif

namespace lazarus {
namespace {

constexpr int64_t kChunk = 1 << 18;  // floats per work item (1 MiB): large enough to stream, many per thread

int64_t head_to_alignment(const float* p, int64_t n) {
  const auto misalign = reinterpret_cast<uintptr_t>(p) & 31u;
  return misalign ? std::min<int64_t>(n, (32 - misalign) / sizeof(float)) : 0;
}

#if LAZARUS_X86
__attribute__((target("avx2"))) void fill_range_avx2(float* dst, int64_t n, float value) {
  int64_t i = head_to_alignment(dst, n);
  for (int64_t j = 0; j < i; ++j) dst[j] = value;
  const __m256 v = _mm256_set1_ps(value);
  for (; i + 32 <= n; i += 32) {
    _mm256_stream_ps(dst + i, v);
    _mm256_stream_ps(dst + i + 8, v);
    _mm256_stream_ps(dst + i + 16, v);
    _mm256_stream_ps(dst + i + 24, v);
  }
  for (; i < n; ++i) dst[i] = value;
  _mm_sfence();
}

__attribute__((target("avx2"))) void copy_range_avx2(const float* src, float* dst, int64_t n) {
  int64_t i = head_to_alignment(dst, n);
  for (int64_t j = 0; j < i; ++j) dst[j] = src[j];
  for (; i + 32 <= n; i += 32) {
    _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    _mm256_stream_ps(dst + i + 8, _mm256_loadu_ps(src + i + 8));
    _mm256_stream_ps(dst + i + 16, _mm256_loadu_ps(src + i + 16));
    _mm256_stream_ps(dst + i + 24, _mm256_loadu_ps(src + i + 24));
  }
  for (; i < n; ++i) dst[i] = src[i];
  _mm_sfence();
}

// The read probe streams kReadStreams sub-ranges of its item at once, one 64-byte line of each per step. Which
// software prefetch is fastest depends on the CPU, so the probe runs each (the caller keeps the best):
//   kPrefetchNone: none (the hardware prefetchers only);
//   kPrefetchL1:   each line kReadAhead bytes ahead into L1;
//   kPrefetchL1L2: that and kReadAheadL2 ahead into L2 (prefetcht2), the GEMVs' distances until 2026-12-03;
//   kPrefetchKernels: the GEMVs' prefetch_stream distances now (kStreamAhead, kStreamAheadL2), so the floor is
//                  at least as strong a reader as the kernels it bounds.
// A plain one-stream read left the read floor 10-25 % below what those kernels' reads reach. Measured on two
// threads, flushed, interleaved rounds (median GB/s):
//   Intel, AVX-512 (1 GB):  one stream, no prefetch 19.0-21.1; 8 streams + L1 prefetch 23.4-25.0; 2 streams +
//                           L1 + L2 25.3; (22 MB): 18.7-20.8, 24.6-25.7, 27.9.
//   AMD Zen 3 (256 MB):     2 streams, no prefetch 20.2; L1 + L2 17.8 (22 MB: 19.7 against 15.6).
constexpr int kReadStreams = 2;
constexpr int64_t kReadAhead = 2048, kReadAheadL2 = 8192;

template <int Policy>
__attribute__((target("avx2"))) double read_range_avx2(const float* src, int64_t n) {
  const int64_t len = n / kReadStreams / 16 * 16;  // floats per stream, whole lines
  __m256 acc[kReadStreams];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t off = 0; off < len; off += 16) {
    for (int s = 0; s < kReadStreams; ++s) {
      const float* q = src + s * len + off;
      const char* line = reinterpret_cast<const char*>(q);
      if (Policy == kPrefetchL1 || Policy == kPrefetchL1L2) _mm_prefetch(line + kReadAhead, _MM_HINT_T0);
      if (Policy == kPrefetchL1L2) _mm_prefetch(line + kReadAheadL2, _MM_HINT_T2);
      if (Policy == kPrefetchKernels) {
        _mm_prefetch(line + kStreamAhead, _MM_HINT_T0);
        _mm_prefetch(line + kStreamAheadL2, _MM_HINT_T2);
      }
      acc[s] = _mm256_add_ps(acc[s], _mm256_add_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(q + 8)));
    }
  }
  __m256 total = acc[0];
  for (int s = 1; s < kReadStreams; ++s) total = _mm256_add_ps(total, acc[s]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  double sum = 0.0;
  for (float v : lanes) sum += v;
  for (int64_t i = kReadStreams * len; i < n; ++i) sum += src[i];
  return sum;
}

bool has_avx2() { return __builtin_cpu_supports("avx2"); }
#else
bool has_avx2() { return false; }
#endif

void fill_range(float* dst, int64_t n, float value) {
#if LAZARUS_X86
  if (has_avx2()) return fill_range_avx2(dst, n, value);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = value;
}

void copy_range(const float* src, float* dst, int64_t n) {
#if LAZARUS_X86
  if (has_avx2()) return copy_range_avx2(src, dst, n);
#endif
  std::copy(src, src + n, dst);
}

double read_range(const float* src, int64_t n, int policy) {
#if LAZARUS_X86
  if (has_avx2()) {
    switch (policy) {
      case kPrefetchNone: return read_range_avx2<kPrefetchNone>(src, n);
      case kPrefetchL1: return read_range_avx2<kPrefetchL1>(src, n);
      case kPrefetchKernels: return read_range_avx2<kPrefetchKernels>(src, n);
      default: return read_range_avx2<kPrefetchL1L2>(src, n);
    }
  }
#else
  (void)policy;
#endif
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += src[i];
  return s;
}

}  // namespace

void stream_fill_cpu(float* dst, int64_t n, float value) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) fill_range(dst + c * kChunk, std::min(kChunk, n - c * kChunk), value);
}

void stream_copy_cpu(const float* src, float* dst, int64_t n) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    copy_range(src + c * kChunk, dst + c * kChunk, std::min(kChunk, n - c * kChunk));
  }
}

double stream_read_cpu(const float* src, int64_t n, int policy) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) partial[c] = read_range(src + c * kChunk, std::min(kChunk, n - c * kChunk), policy);
  double s = 0.0;
  for (double v : partial) s += v;
  return s;
}

namespace {
constexpr int64_t kLine = 64;  // bytes per cache line on every x86-64 CPU
constexpr int64_t kFlushChunk = 1 << 20;  // bytes per work item

#if LAZARUS_X86
__attribute__((target("clflushopt"))) void flush_lines_opt(const char* p, int64_t n) {
  for (int64_t i = 0; i < n; i += kLine) _mm_clflushopt(const_cast<char*>(p + i));  // the intrinsic takes void*
}

void flush_lines(const char* p, int64_t n) {
  for (int64_t i = 0; i < n; i += kLine) _mm_clflush(p + i);
}
#endif
}  // namespace

bool flush_cache_cpu(const void* p, int64_t bytes) {
#if LAZARUS_X86
  if (bytes <= 0) return true;
  const uintptr_t start = reinterpret_cast<uintptr_t>(p) & ~static_cast<uintptr_t>(kLine - 1);
  const int64_t n = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) + bytes - start);
  const char* base = reinterpret_cast<const char*>(start);
  const bool opt = __builtin_cpu_supports("clflushopt");
  const int64_t chunks = (n + kFlushChunk - 1) / kFlushChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t len = std::min(kFlushChunk, n - c * kFlushChunk);
    if (opt) {
      flush_lines_opt(base + c * kFlushChunk, len);
    } else {
      flush_lines(base + c * kFlushChunk, len);
    }
  }
  _mm_mfence();
  return true;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

namespace {
#if LAZARUS_X86
constexpr int kDotChains = 12;
// 12 accumulators in named registers: more independent chains than the dot unit's latency x throughput (5 x 2 at
// most), so the loop runs at its throughput, and few enough that they, the operands and a temporary fit the 16
// ymm registers of AVX2 (16 chains spilled two of them to the stack each step: the AVX2 probe read 1.95 G
// vpmaddubsw/s on one Zen 3 core against 5.2 G/s with 12); the empty asm with every accumulator as an operand
// keeps each step.
#define LZ_DOT_STEPS(V, INIT, DOT)                                                                          \
  V c0 = INIT, c1 = INIT, c2 = INIT, c3 = INIT, c4 = INIT, c5 = INIT, c6 = INIT, c7 = INIT;                 \
  V c8 = INIT, c9 = INIT, c10 = INIT, c11 = INIT;                                                          \
  for (int64_t i = 0; i < iters; ++i) {                                                                    \
    c0 = DOT(c0, a, b), c1 = DOT(c1, a, b), c2 = DOT(c2, a, b), c3 = DOT(c3, a, b);                          \
    c4 = DOT(c4, a, b), c5 = DOT(c5, a, b), c6 = DOT(c6, a, b), c7 = DOT(c7, a, b);                          \
    c8 = DOT(c8, a, b), c9 = DOT(c9, a, b), c10 = DOT(c10, a, b), c11 = DOT(c11, a, b);                      \
    __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5));                      \
    __asm__ volatile("" : "+v"(c6), "+v"(c7), "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11));                    \
  }                                                                                                        \
  const V all[kDotChains] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};                             \
  int64_t sink = 0;                                                                                        \
  for (const V& v : all) {                                                                                 \
    int32_t lane;                                                                                          \
    std::memcpy(&lane, &v, 4);                                                                             \
    sink += lane;                                                                                          \
  }                                                                                                        \
  return sink;

__attribute__((target("avx512f,avx512bw,avx512vnni"))) int64_t dot_loop_zmm(int64_t iters) {
  const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(1);
  LZ_DOT_STEPS(__m512i, _mm512_setzero_si512(), _mm512_dpbusd_epi32)
}

__attribute__((target("avx2,avxvnni"))) int64_t dot_loop_ymm(int64_t iters) {
  const __m256i a = _mm256_set1_epi8(1), b = _mm256_set1_epi8(1);
  LZ_DOT_STEPS(__m256i, _mm256_setzero_si256(), _mm256_dpbusd_avx_epi32)
}
// AVX2 without VNNI: vpmaddubsw, the u8 x s8 product the AVX2 integer kernels run (32 products per instruction,
// pairs summed to int16), each chain fed back into its own unsigned operand.
__attribute__((target("avx2"))) int64_t dot_loop_avx2(int64_t iters) {
  const __m256i b = _mm256_set1_epi8(1);
#define LZ_MADDUBS(c, a, b) _mm256_maddubs_epi16(c, b)
  LZ_DOT_STEPS(__m256i, _mm256_set1_epi8(1), LZ_MADDUBS)
#undef LZ_MADDUBS
}
#undef LZ_DOT_STEPS
#endif
}  // namespace

int64_t int8_dot_loop_cpu(int64_t iters) {
#if LAZARUS_X86
  const bool zmm = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vnni");
  const bool vnni = __builtin_cpu_supports("avxvnni");
  if (!zmm && !vnni && !__builtin_cpu_supports("avx2")) return 0;
  int64_t threads = 1, sink = 0;
#pragma omp parallel reduction(+ : sink)
  {
#if defined(LAZARUS_WITH_OPENMP)
#pragma omp single
    threads = omp_get_num_threads();
#endif
    sink += zmm ? dot_loop_zmm(iters) : vnni ? dot_loop_ymm(iters) : dot_loop_avx2(iters);
  }
  if (sink == 42) threads += 0;  // the sums are used: the loops cannot be dropped
  return threads * iters * kDotChains * (zmm ? 64 : 32);
#else
  (void)iters;
  return 0;
#endif
}

}  // namespace lazarus
