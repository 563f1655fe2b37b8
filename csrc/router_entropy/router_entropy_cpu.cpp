// Why: router entropy on the CPU in one pass over the logits per row (converted to fp32 in registers),
// OpenMP over row blocks with per-thread float64 prob_sum partials reduced in thread
// order at the end (deterministic), an AVX2/F16C/FMA path chosen at run time and a portable path.
#include "router_entropy/router_entropy.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(LAZARUS_WITH_OPENMP)
#include <omp.h>
#endif

#include "common/avx2_math.h"
#include "common/float_bits.h"
#include "router_entropy/router_entropy_math.h"

#if defined(__x86_64__) || defined(_M_X64)
#define LAZARUS_RE_X86 1
#include <immintrin.h>
#endif

namespace lazarus {
namespace {

namespace re = router_entropy;

// Rows per OpenMP work item (256 rows of 64 fp16 experts = 32 KiB).
constexpr int64_t kChunkRows = 256;
// Rows taken phase by phase on the SIMD path (their fp32 column sums join the float64 partial per block),
// and the floats of their scratch (16 KiB: stays in L1).
constexpr int64_t kMaxBlockRows = 32;
constexpr int64_t kBlockFloats = 4096;

float load_scalar(const void* logits, LogitDtype dtype, int64_t i) {
  switch (dtype) {
    case LogitDtype::kF16: return re::half_bits_to_float(static_cast<const uint16_t*>(logits)[i]);
    case LogitDtype::kBF16: return bf16_bits_to_float(static_cast<const uint16_t*>(logits)[i]);
    default: return static_cast<const float*>(logits)[i];
  }
}

// One row through the shared host/device arithmetic; `y` is scratch of `experts` floats.
void row_portable(const void* logits, LogitDtype dtype, int64_t row, int64_t experts, bool sigmoid, float* y,
                  float* entropy, double* partial) {
  const int64_t base = row * experts;
  float y_max = -std::numeric_limits<float>::infinity();
  bool any_nan = false;
  for (int64_t j = 0; j < experts; ++j) {
    y[j] = re::log_weight(load_scalar(logits, dtype, base + j), sigmoid);
    any_nan |= std::isnan(y[j]);
    y_max = std::max(y_max, y[j]);
  }
  if (any_nan) y_max = std::numeric_limits<float>::quiet_NaN();
  float z = 0.0f, s = 0.0f;
  for (int64_t j = 0; j < experts; ++j) {
    const float d = y[j] - y_max;
    const float e = std::exp(d);
    y[j] = e;
    z += e;
    s += re::weighted_shift(e, d);
  }
  entropy[row] = re::entropy_from_sums(z, s);
  const float inv_z = 1.0f / z;
  for (int64_t j = 0; j < experts; ++j) partial[j] += static_cast<double>(y[j] * inv_z);
}

#if defined(LAZARUS_RE_X86)
#define LZ_AVX2 __attribute__((target("avx2,fma,f16c")))

bool cpu_has_avx2_f16c_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

// log(x) for normal x > 0 (Cephes logf: mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial).
LZ_AVX2 inline __m256 log_positive(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_or_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x007FFFFF))),
                          _mm256_set1_ps(0.5f));  // [0.5, 1)
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  m = _mm256_add_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.0f)), _mm256_and_ps(small, m));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

template <LogitDtype D>
LZ_AVX2 inline __m256 load8(const void* logits, int64_t i) {
  if constexpr (D == LogitDtype::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(logits) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(logits) + i));
    if constexpr (D == LogitDtype::kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

LZ_AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Rows [begin, end) (at most kChunkRows), in blocks of `block` rows taken phase by phase (convert + max for
// every row of the block, then exp and the sums, then the column sums), so that consecutive rows overlap in
// the out-of-order core instead of waiting on each row's reductions. `y` holds 2 * block * padded floats
// (experts rounded up to 8, the padding at -inf; the second half: sigmoid(x) for sigmoid scoring), `p32`
// padded floats, `partial` padded doubles. Rows without a finite
// maximum go through the portable row. Column sums are gathered in fp32 over one block (<= kMaxBlockRows
// rows), then added in float64; the logs of the row sums are taken 8 rows at a time.
template <LogitDtype D, bool kSigmoid>
LZ_AVX2 void rows_avx2(const void* logits, int64_t begin, int64_t end, int64_t experts, float* y, int64_t block,
                       float* scratch, float* p32, float* entropy, double* partial) {
  const int64_t padded = (experts + 7) / 8 * 8;
  const int64_t full = experts / 8 * 8;
  const int64_t item = D == LogitDtype::kF32 ? 4 : 2;
  alignas(32) float z_rows[kChunkRows], q_rows[kChunkRows], max_rows[kMaxBlockRows];
  bool bad_rows[kMaxBlockRows];
  alignas(32) unsigned char tail[32];
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 floor_d = _mm256_set1_ps(-87.5f);  // exp is exactly 0 below -87.3: e * d stays 0, never 0 * -inf
  const __m256 tail_valid = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_ps(static_cast<float>(experts - full)), _CMP_LT_OQ);
  for (int64_t b0 = begin; b0 < end; b0 += block) {
    const int64_t nb = std::min(block, end - b0);
    for (int64_t r = 0; r < nb; ++r) {  // convert, log weights, max
      const int64_t base = (b0 + r) * experts;
      float* yr = y + r * padded;
      float* sr = y + (block + r) * padded;  // sigmoid scoring: sigmoid(x)
      (void)sr;
      __m256 vmax = neg_inf;
      __m256 nan_seen = _mm256_setzero_ps();
      for (int64_t j = 0; j < padded; j += 8) {
        __m256 x;
        if (j < full) {
          x = load8<D>(logits, base + j);
        } else {  // the last partial vector: copy the row's tail, convert, set the padding to -inf
          std::memcpy(tail, static_cast<const unsigned char*>(logits) + (base + j) * item, (experts - full) * item);
          x = _mm256_blendv_ps(neg_inf, load8<D>(tail, 0), tail_valid);
        }
        if constexpr (kSigmoid) {
          // y = log sigmoid(x) = min(x, 0) - log1p(u), u = exp(-|x|): log1p(u) = log(v) + (u - (v - 1)) / v with
          // v = 1 + u rounded (the correction restores what rounding v lost). sigmoid(x) = (x >= 0 ? 1 : u) / v
          // is kept too: it saves the second exp.
          const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
          const __m256 u = simd::exp_avx2(_mm256_xor_ps(_mm256_and_ps(x, abs_mask), _mm256_set1_ps(-0.0f)));
          const __m256 v = _mm256_add_ps(u, _mm256_set1_ps(1.0f));
          __m256 inv_v = _mm256_rcp_ps(v);
          inv_v = _mm256_mul_ps(inv_v, _mm256_fnmadd_ps(v, inv_v, _mm256_set1_ps(2.0f)));  // one Newton step
          const __m256 lost = _mm256_sub_ps(u, _mm256_sub_ps(v, _mm256_set1_ps(1.0f)));
          const __m256 l1p = _mm256_fmadd_ps(lost, inv_v, log_positive(v));
          const __m256 positive = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
          _mm256_storeu_ps(sr + j, _mm256_mul_ps(_mm256_blendv_ps(u, _mm256_set1_ps(1.0f), positive), inv_v));
          x = _mm256_sub_ps(_mm256_min_ps(x, _mm256_setzero_ps()), l1p);
        }
        nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        vmax = _mm256_max_ps(vmax, x);
        _mm256_storeu_ps(yr + j, x);
      }
      max_rows[r] = hmax(vmax);
      bad_rows[r] = !std::isfinite(max_rows[r]) || _mm256_movemask_ps(nan_seen) != 0;
    }
    for (int64_t r = 0; r < nb; ++r) {  // exp, Z, S
      const int64_t k = b0 - begin + r;
      float* yr = y + r * padded;
      if (bad_rows[r]) {
        row_portable(logits, D, b0 + r, experts, kSigmoid, scratch, entropy, partial);
        z_rows[k] = 1.0f;  // log 1 - q = the portable entropy
        q_rows[k] = -entropy[b0 + r];
        for (int64_t j = 0; j < padded; ++j) yr[j] = 0.0f;
        continue;
      }
      const __m256 m = _mm256_set1_ps(max_rows[r]);
      __m256 vz = _mm256_setzero_ps(), vs = _mm256_setzero_ps();
      // sigmoid: e = sigmoid(x) / sigmoid(max x), from the stored sigmoids, unless they may have underflowed
      // (max sigmoid below e^-60; an element whose sigmoid underflows weighs below e^-27 next to the maximum)
      if (kSigmoid && max_rows[r] >= -60.0f) {
        const float* sr = y + (block + r) * padded;
        const __m256 inv_max = _mm256_set1_ps(std::exp(-max_rows[r]));
        for (int64_t j = 0; j < padded; j += 8) {
          const __m256 d = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(yr + j), m), floor_d);
          const __m256 e = _mm256_mul_ps(_mm256_loadu_ps(sr + j), inv_max);
          vz = _mm256_add_ps(vz, e);
          vs = _mm256_fmadd_ps(e, d, vs);
          _mm256_storeu_ps(yr + j, e);
        }
      } else {
        for (int64_t j = 0; j < padded; j += 8) {
          const __m256 d = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(yr + j), m), floor_d);
          const __m256 e = simd::exp_avx2(d);
          vz = _mm256_add_ps(vz, e);
          vs = _mm256_fmadd_ps(e, d, vs);
          _mm256_storeu_ps(yr + j, e);
        }
      }
      // [z, s] from the two vectors in one reduction tree
      const __m256 h = _mm256_hadd_ps(vz, vs);
      __m128 zs = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      zs = _mm_hadd_ps(zs, zs);
      const float z = _mm_cvtss_f32(zs);
      const float inv_z = 1.0f / z;
      z_rows[k] = z;
      q_rows[k] = _mm_cvtss_f32(_mm_shuffle_ps(zs, zs, 1)) * inv_z;
      max_rows[r] = inv_z;  // reused: 1 / Z
    }
    for (int64_t j = 0; j < padded; ++j) p32[j] = 0.0f;
    for (int64_t r = 0; r < nb; ++r) {  // column sums of p = e / Z
      const float* yr = y + r * padded;
      const __m256 inv_z = _mm256_set1_ps(max_rows[r]);
      for (int64_t j = 0; j < padded; j += 8) {
        _mm256_storeu_ps(p32 + j, _mm256_fmadd_ps(_mm256_loadu_ps(yr + j), inv_z, _mm256_loadu_ps(p32 + j)));
      }
    }
    for (int64_t j = 0; j < padded; j += 4) {
      _mm256_storeu_pd(partial + j, _mm256_add_pd(_mm256_loadu_pd(partial + j), _mm256_cvtps_pd(_mm_loadu_ps(p32 + j))));
    }
  }
  const int64_t n = end - begin;
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    _mm256_storeu_ps(entropy + begin + k, _mm256_sub_ps(log_positive(_mm256_load_ps(z_rows + k)), _mm256_load_ps(q_rows + k)));
  }
  for (; k < n; ++k) entropy[begin + k] = std::log(z_rows[k]) - q_rows[k];
}
using RowsFn = void (*)(const void*, int64_t, int64_t, int64_t, float*, int64_t, float*, float*, float*, double*);

RowsFn rows_avx2_for(LogitDtype dtype, bool sigmoid) {
  switch (dtype) {
    case LogitDtype::kF16: return sigmoid ? &rows_avx2<LogitDtype::kF16, true> : &rows_avx2<LogitDtype::kF16, false>;
    case LogitDtype::kBF16: return sigmoid ? &rows_avx2<LogitDtype::kBF16, true> : &rows_avx2<LogitDtype::kBF16, false>;
    default: return sigmoid ? &rows_avx2<LogitDtype::kF32, true> : &rows_avx2<LogitDtype::kF32, false>;
  }
}
#endif

void run(const void* logits, LogitDtype dtype, int64_t rows, int64_t experts, RouterScoring scoring, float* entropy,
         double* prob_sum, bool allow_simd) {
  const bool sigmoid = scoring == RouterScoring::kSigmoid;
  const int64_t padded = (experts + 7) / 8 * 8;
  const int64_t n_chunks = (rows + kChunkRows - 1) / kChunkRows;
#if defined(LAZARUS_WITH_OPENMP)
  const int n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), n_chunks)));
#else
  const int n_threads = 1;
#endif
  std::vector<double> partials(static_cast<size_t>(n_threads) * padded, 0.0);
#if defined(LAZARUS_RE_X86)
  const bool simd = allow_simd && cpu_has_avx2_f16c_fma();
  const RowsFn rows_simd = simd ? rows_avx2_for(dtype, sigmoid) : nullptr;
#else
  (void)allow_simd;
  const bool simd = false;
#endif
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
  {
#if defined(LAZARUS_WITH_OPENMP)
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    const int64_t block = std::max<int64_t>(1, std::min(kMaxBlockRows, kBlockFloats / padded));
    std::vector<float> y(2 * block * padded), scratch(padded), p32(padded);  // y, then sigmoid(x)
    double* partial = partials.data() + static_cast<size_t>(tid) * padded;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t begin = c * kChunkRows, end = std::min(rows, begin + kChunkRows);
#if defined(LAZARUS_RE_X86)
      if (simd) {
        rows_simd(logits, begin, end, experts, y.data(), block, scratch.data(), p32.data(), entropy, partial);
        continue;
      }
#endif
      for (int64_t row = begin; row < end; ++row) {
        row_portable(logits, dtype, row, experts, sigmoid, y.data(), entropy, partial);
      }
    }
  }
  for (int64_t j = 0; j < experts; ++j) {
    double total = 0.0;
    for (int t = 0; t < n_threads; ++t) total += partials[static_cast<size_t>(t) * padded + j];
    prob_sum[j] = total;
  }
}

}  // namespace

void router_entropy_rows_cpu(const void* logits, LogitDtype dtype, int64_t rows, int64_t experts,
                             RouterScoring scoring, float* entropy, double* prob_sum) {
  run(logits, dtype, rows, experts, scoring, entropy, prob_sum, true);
}

namespace detail {
void router_entropy_rows_portable(const void* logits, LogitDtype dtype, int64_t rows, int64_t experts,
                                  RouterScoring scoring, float* entropy, double* prob_sum) {
  run(logits, dtype, rows, experts, scoring, entropy, prob_sum, false);
}
}  // namespace detail

}  // namespace lazarus
