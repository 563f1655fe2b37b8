// Why: the CPU overlay MoE kernels, reading every weight in its stored precision (fp32, bf16, fp16, MXFP4)
// and computing in fp32 registers. The fused expand + activation + weighted reduction groups pairs by
// expert so each expand row A[e]^T[j, cols] is loaded once per tile of 4 pairs; threads own column blocks,
// so the per-token sums need no atomics and are deterministic. The matrix-vector kernels (base GEMV of
// small batches, grouped shrink) decode a weight row in registers and apply it to up to 4 tokens at once.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/avx2_math.h"
#include "common/float_bits.h"
#include "common/mxfp4_codec.h"
#include "overlay_moe/overlay_moe.h"
#include "overlay_moe/overlay_moe_math.h"

// LZ_OMP(directive): `#pragma omp directive` when built with OpenMP, nothing otherwise.
#if defined(LAZARUS_WITH_OPENMP)
#define LZ_PRAGMA(x) _Pragma(#x)
#define LZ_OMP(directive) LZ_PRAGMA(omp directive)
#else
#define LZ_OMP(directive)
#endif

namespace lazarus {
namespace {

constexpr int64_t kCols = 256;        // columns per block: pair rows read as 1 KB runs; 4 pairs x 2 x 256 floats
constexpr int64_t kTile = 4;          // pairs sharing one pass over an expert's expand rows
constexpr int kMaxTokens = 4;         // token rows sharing one pass over a weight row in the matrix-vector kernels
constexpr int64_t kRowsPerItem = 16;  // weight rows per OpenMP work item of the matrix-vector kernels
constexpr int64_t kPrefetchBytes = 512;  // software prefetch distance along each expand row

inline float sigmoid_cpu(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// The family activation; the GPT-OSS clamps propagate NaN as torch.clamp does (a comparison with NaN is
// false, so a NaN passes through unchanged).
inline float activation_cpu(float g, float u, int kind, float alpha, float limit) {
  if (kind == overlay::kGptOss) {
    g = g > limit ? limit : g;
    u = u > limit ? limit : (u < -limit ? -limit : u);
    return g * sigmoid_cpu(alpha * g) * (u + 1.0f);
  }
  return g * sigmoid_cpu(g) * u;
}

// acc[q][c] += sum_j s[q][j] * at[j][c0 + c]   for q < n pairs, c < w columns (portable loop)
template <typename F>
void expand_tile_portable(float (*acc)[kCols], const float* const* s, int64_t n, const F* at, int64_t rank,
                          int64_t ld, int64_t c0, int64_t w) {
  for (int64_t j = 0; j < rank; ++j) {
    const F* row = at + j * ld + c0;
    for (int64_t q = 0; q < n; ++q) {
      const float sj = s[q][j];
      float* out = acc[q];
      for (int64_t c = 0; c < w; ++c) out[c] += sj * to_float(row[c]);
    }
  }
}

#if defined(LAZARUS_AVX2_MATH)
// Register-blocked AVX2/FMA micro-kernel: N pairs x 16 columns stay in 2N ymm accumulators for the whole
// rank loop, so each expand row is loaded (and converted to fp32) once per N pairs.
template <int N, typename F>
LZ_TARGET_AVX2 void expand_tile_avx2(float (*acc)[kCols], const float* const* s, const F* at, int64_t rank,
                                     int64_t ld, int64_t c0, int64_t w) {
  int64_t c = 0;
  for (; c + 16 <= w; c += 16) {
    __m256 v[N][2];
    for (int q = 0; q < N; ++q) {
      v[q][0] = _mm256_loadu_ps(acc[q] + c);
      v[q][1] = _mm256_loadu_ps(acc[q] + c + 8);
    }
    const F* col = at + c0 + c;
    for (int64_t j = 0; j < rank; ++j) {
      // The rank rows are `rank` interleaved streams (row stride ld) too many for the hardware prefetcher:
      // fetch each one kPrefetchBytes ahead (about 8 column steps: DRAM latency when few pairs share a pass).
      _mm_prefetch(reinterpret_cast<const char*>(col + j * ld) + kPrefetchBytes, _MM_HINT_T0);
      const __m256 r0 = simd::load8(col + j * ld);
      const __m256 r1 = simd::load8(col + j * ld + 8);
      for (int q = 0; q < N; ++q) {
        const __m256 b = _mm256_broadcast_ss(s[q] + j);
        v[q][0] = _mm256_fmadd_ps(b, r0, v[q][0]);
        v[q][1] = _mm256_fmadd_ps(b, r1, v[q][1]);
      }
    }
    for (int q = 0; q < N; ++q) {
      _mm256_storeu_ps(acc[q] + c, v[q][0]);
      _mm256_storeu_ps(acc[q] + c + 8, v[q][1]);
    }
  }
  for (; c < w; ++c)
    for (int q = 0; q < N; ++q)
      for (int64_t j = 0; j < rank; ++j) acc[q][c] += s[q][j] * to_float(at[j * ld + c0 + c]);
}

// h[c] = act(g[c], u[c]); hw[c] += wt * h[c] for c < w, 8 at a time (scalar tail: activation_cpu).
// min/max return their SECOND operand when either is NaN: the limit goes first so a NaN passes through.
LZ_TARGET_AVX2 void activate_avx2(const float* g, const float* u, int64_t w, int kind, float alpha, float limit,
                                  float wt, float* h, float* hw) {
  const __m256 one = _mm256_set1_ps(1.0f), lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit);
  const __m256 scale = _mm256_set1_ps(kind == overlay::kGptOss ? -alpha : -1.0f), vw = _mm256_set1_ps(wt);
  int64_t c = 0;
  for (; c + 8 <= w; c += 8) {
    __m256 gv = _mm256_loadu_ps(g + c), uv = _mm256_loadu_ps(u + c);
    if (kind == overlay::kGptOss) {
      gv = _mm256_min_ps(lim, gv);
      uv = _mm256_add_ps(_mm256_min_ps(lim, _mm256_max_ps(nlim, uv)), one);
    }
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, simd::exp_avx2(_mm256_mul_ps(scale, gv))));
    const __m256 hv = _mm256_mul_ps(_mm256_mul_ps(gv, sig), uv);
    _mm256_storeu_ps(h + c, hv);
    _mm256_storeu_ps(hw + c, _mm256_fmadd_ps(vw, hv, _mm256_loadu_ps(hw + c)));
  }
  for (; c < w; ++c) {
    h[c] = activation_cpu(g[c], u[c], kind, alpha, limit);
    hw[c] += wt * h[c];
  }
}
#endif

template <typename F>
void expand_tile(float (*acc)[kCols], const float* const* s, int64_t n, const F* at, int64_t rank, int64_t ld,
                 int64_t c0, int64_t w) {
#if defined(LAZARUS_AVX2_MATH)
  if (simd::cpu_has_avx2_fma_f16c()) {
    switch (n) {
      case 1: return expand_tile_avx2<1>(acc, s, at, rank, ld, c0, w);
      case 2: return expand_tile_avx2<2>(acc, s, at, rank, ld, c0, w);
      case 3: return expand_tile_avx2<3>(acc, s, at, rank, ld, c0, w);
      default: return expand_tile_avx2<4>(acc, s, at, rank, ld, c0, w);
    }
  }
#endif
  expand_tile_portable(acc, s, n, at, rank, ld, c0, w);
}

void activate(const float* g, const float* u, int64_t w, int kind, float alpha, float limit, float wt, float* h,
              float* hw) {
#if defined(LAZARUS_AVX2_MATH)
  if (simd::cpu_has_avx2_fma_f16c()) return activate_avx2(g, u, w, kind, alpha, limit, wt, h, hw);
#endif
  for (int64_t c = 0; c < w; ++c) {
    h[c] = activation_cpu(g[c], u[c], kind, alpha, limit);
    hw[c] += wt * h[c];
  }
}

// ---- matrix-vector products of stored weights: out[t] = dot(W row, x[t]) for nt <= kMaxTokens token rows.

template <typename F>
void row_dots_portable(const F* w, int64_t cols, const float* const* x, int nt, float* out) {
  for (int t = 0; t < nt; ++t) {
    float acc = 0.0f;
    for (int64_t c = 0; c < cols; ++c) acc += to_float(w[c]) * x[t][c];
    out[t] = acc;
  }
}

void row_dots_mxfp4_portable(const uint8_t* blocks, const uint8_t* scales, int64_t groups, const float* const* x,
                             int nt, float* out) {
  for (int t = 0; t < nt; ++t) out[t] = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = mxfp4::e8m0_to_float(scales[g]);
    for (int j = 0; j < mxfp4::kBytesPerBlock; ++j) {
      float lo, hi;
      mxfp4::decode_byte(blocks[g * mxfp4::kBytesPerBlock + j], scale, &lo, &hi);
      for (int t = 0; t < nt; ++t) out[t] += lo * x[t][32 * g + 2 * j] + hi * x[t][32 * g + 2 * j + 1];
    }
  }
}

#if defined(LAZARUS_AVX2_MATH)
template <int NT, typename F>
LZ_TARGET_AVX2 void row_dots_avx2(const F* w, int64_t cols, const float* const* x, float* out) {
  __m256 acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    const __m256 w0 = simd::load8(w + c), w1 = simd::load8(w + c + 8);
    for (int t = 0; t < NT; ++t) {
      acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + c), acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[t] + c + 8), acc[t][1]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    float tail = 0.0f;
    for (int64_t k = c; k < cols; ++k) tail += to_float(w[k]) * x[t][k];
    out[t] = simd::hsum(_mm256_add_ps(acc[t][0], acc[t][1])) + tail;
  }
}

// 2^(s-152): the E8M0 scale 2^(s-127) times 1/2 (the code table holds twice each E2M1 value) times 2^-24 (the
// decoded integers sit in the top byte of an int32). 0xFF is NaN; s < 26 is subnormal or 0: such blocks hold
// weights below 2^-78, whose products are then rounded (or dropped) at that tiny scale.
struct BlockScales {
  float v[256];
  BlockScales() {
    for (int s = 0; s < 256; ++s) v[s] = mxfp4::e8m0_to_float(static_cast<uint8_t>(s)) * 2.98023223876953125e-8f;
  }
};

// One MXFP4 block as fp32 times 2^25, in the order permute_for_mxfp4 gives x. The 16 bytes go to both lanes;
// lane 0 keeps the low nibbles (elements 0, 2, ..., 30), lane 1 the high ones (1, 3, ..., 31); a byte shuffle
// maps each code to 2 * its E2M1 value as int8, and four more place bytes 4k..4k+3 of each lane in the top byte
// of a 32-bit lane (sign included), converted to fp32: f[k] = elements 8k + {0, 2, 4, 6, 1, 3, 5, 7}.
LZ_TARGET_AVX2 inline void decode_block_shifted(const uint8_t* bytes, __m256 f[4]) {
  const __m256i shifts = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i twice_e2m1 = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
                                              0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(packed, shifts), _mm256_set1_epi8(0x0F));
  const __m256i v = _mm256_shuffle_epi8(twice_e2m1, codes);
  constexpr char z = -128;  // a shuffle index with the top bit set writes 0
  const __m256i spread[4] = {
      _mm256_setr_epi8(z, z, z, 0, z, z, z, 1, z, z, z, 2, z, z, z, 3, z, z, z, 0, z, z, z, 1, z, z, z, 2, z, z, z, 3),
      _mm256_setr_epi8(z, z, z, 4, z, z, z, 5, z, z, z, 6, z, z, z, 7, z, z, z, 4, z, z, z, 5, z, z, z, 6, z, z, z, 7),
      _mm256_setr_epi8(z, z, z, 8, z, z, z, 9, z, z, z, 10, z, z, z, 11, z, z, z, 8, z, z, z, 9, z, z, z, 10, z, z, z,
                       11),
      _mm256_setr_epi8(z, z, z, 12, z, z, z, 13, z, z, z, 14, z, z, z, 15, z, z, z, 12, z, z, z, 13, z, z, z, 14, z, z,
                       z, 15)};
  for (int k = 0; k < 4; ++k) f[k] = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(v, spread[k]));
}

// One MXFP4 row against NT token rows permuted by permute_for_mxfp4: each token's block dot product (on the
// shifted codes) is scaled once, into a per-token accumulator.
template <int NT>
LZ_TARGET_AVX2 void row_dots_mxfp4_avx2(const uint8_t* blocks, const uint8_t* scales, int64_t groups,
                                        const float* const* xp, float* out) {
  static const BlockScales block_scales;
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 f[4];
    decode_block_shifted(blocks + 16 * g, f);
    const __m256 scale = _mm256_set1_ps(block_scales.v[scales[g]]);
    for (int t = 0; t < NT; ++t) {
      const float* xg = xp[t] + 32 * g;
      const __m256 p = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xg + 8), _mm256_mul_ps(f[0], _mm256_loadu_ps(xg)));
      const __m256 q = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xg + 24), _mm256_mul_ps(f[2], _mm256_loadu_ps(xg + 16)));
      acc[t] = _mm256_fmadd_ps(_mm256_add_ps(p, q), scale, acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = simd::hsum(acc[t]);
}

// One MXFP4 row decoded to fp32 (exact) in the permuted order, for rows applied to many tokens.
LZ_TARGET_AVX2 void decode_row_mxfp4_avx2(const uint8_t* blocks, const uint8_t* scales, int64_t groups, float* out) {
  static const BlockScales block_scales;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 f[4];
    decode_block_shifted(blocks + 16 * g, f);
    const __m256 scale = _mm256_set1_ps(block_scales.v[scales[g]]);
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + 32 * g + 8 * k, _mm256_mul_ps(f[k], scale));
  }
}

// The scale of one (weight block, token block) product in the int16 kernel, 2^(s-127) / 2 * 2^-k (the code table
// holds twice each E2M1 value; the token block was scaled by 2^k), indexed by s + u with u = 128 - k in [1, 241]:
// v[j] = 2^(j-256), 0 or inf where fp32 cannot hold it. Rows with a NaN scale (0xFF) run the fp32 kernel.
struct ProductScales {
  float v[512];
  ProductScales() {
    for (int j = 0; j < 512; ++j) v[j] = std::ldexp(1.0f, j - 256);
  }
};

// One MXFP4 row against NT token rows quantised by quantize_for_mxfp4 (int16 per 32-element block, index u):
// the block's codes become 2 * E2M1 as int16 (one byte shuffle, sign-extended by an unpack), multiplied with
// the int16 tokens and summed pairwise in int32 (vpmaddwd: exact, |sum| <= 32 * 12 * 32767 < 2^24, so also
// exact when converted to fp32); one fp32 FMA per block applies weight scale x token scale (one table load). The
// decode is shared by the NT tokens.
template <int NT>
LZ_TARGET_AVX2 void row_dots_mxfp4_q16_avx2(const uint8_t* blocks, const uint8_t* scales, int64_t groups,
                                            const int16_t* const* q, const uint16_t* const* u, float* out) {
  static const ProductScales product_scales;
  const __m256i shifts = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i twice_e2m1 = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
                                              0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m256i nibble = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  // Two accumulators per token (even and odd blocks): one FMA chain per block would wait on its latency.
  __m256 acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  const auto block = [&](int64_t g, int k) LZ_TARGET_AVX2 {
    const __m256i packed =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 16 * g)));
    const __m256i w8 = _mm256_shuffle_epi8(twice_e2m1, _mm256_and_si256(_mm256_srlv_epi32(packed, shifts), nibble));
    const __m256i sign = _mm256_cmpgt_epi8(zero, w8);
    const __m256i lo = _mm256_unpacklo_epi8(w8, sign), hi = _mm256_unpackhi_epi8(w8, sign);
    const float* scale_row = product_scales.v + scales[g];
    for (int t = 0; t < NT; ++t) {
      const __m256i* xg = reinterpret_cast<const __m256i*>(q[t] + 32 * g);
      const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(xg)),
                                           _mm256_madd_epi16(hi, _mm256_loadu_si256(xg + 1)));
      acc[t][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_broadcast_ss(scale_row + u[t][g]), acc[t][k]);
    }
  };
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    block(g, 0);
    block(g + 1, 1);
  }
  if (g < groups) block(g, 0);
  for (int t = 0; t < NT; ++t) out[t] = simd::hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
}
#endif

// Token rows for the int16 MXFP4 kernel. Per 32-element block: k = 15 - e where max|x| = f * 2^e, f in [0.5, 1)
// (k <= 127), q = round(x * 2^k) clamped to +-32767 in the order the kernel's unpacks give the weights
// ([0, 2, .., 14], [1, 3, .., 15], [16, 18, .., 30], [17, .., 31]), u = 128 - k (ProductScales' index). Each
// element is off by at most 2^-15 of its block's largest |x|. Returns false (nothing usable) when the row holds
// inf or NaN.
bool quantize_for_mxfp4(const float* x, int64_t cols, int16_t* q, uint16_t* u) {
  for (int64_t g = 0; g < cols / 32; ++g) {
    const float* xb = x + 32 * g;
    float m = 0.0f;
    for (int i = 0; i < 32; ++i) m = std::max(m, std::fabs(xb[i]));
    if (!std::isfinite(m)) return false;
    int e = 0;
    std::frexp(m, &e);
    const int k = m > 0.0f ? std::min(127, 15 - e) : 0;
    const float up = std::ldexp(1.0f, k);
    u[g] = static_cast<uint16_t>(128 - k);
    int16_t* qb = q + 32 * g;
    for (int p = 0; p < 32; ++p) {
      const int within = p % 16, element = 16 * (p / 16) + 2 * (within % 8) + within / 8;
      const float v = std::nearbyint(xb[element] * up);
      qb[p] = static_cast<int16_t>(std::max(-32767.0f, std::min(32767.0f, v)));
    }
  }
  return true;
}

// Element order decode_block_shifted produces: within each 8 elements, the even ones, then the odd ones.
void permute_for_mxfp4(const float* x, int64_t cols, float* xp) {
  for (int64_t b = 0; b < cols; b += 8)
    for (int j = 0; j < 4; ++j) {
      xp[b + j] = x[b + 2 * j];
      xp[b + 4 + j] = x[b + 2 * j + 1];
    }
}

bool use_avx2() {
#if defined(LAZARUS_AVX2_MATH)
  return simd::cpu_has_avx2_fma_f16c();
#else
  return false;
#endif
}

// out[t] = dot(row r of w, x[t]) for t < nt <= kMaxTokens (x permuted for MXFP4 when use_avx2()).
template <typename F>
void row_dots(const StoredMatrix& w, int64_t r, const float* const* x, int nt, float* out) {
  const F* row = static_cast<const F*>(w.data) + r * w.cols;
#if defined(LAZARUS_AVX2_MATH)
  if (use_avx2()) {
    switch (nt) {
      case 1: return row_dots_avx2<1>(row, w.cols, x, out);
      case 2: return row_dots_avx2<2>(row, w.cols, x, out);
      case 3: return row_dots_avx2<3>(row, w.cols, x, out);
      default: return row_dots_avx2<4>(row, w.cols, x, out);
    }
  }
#endif
  row_dots_portable(row, w.cols, x, nt, out);
}

template <>
void row_dots<uint8_t>(const StoredMatrix& w, int64_t r, const float* const* x, int nt, float* out) {
  const int64_t groups = w.cols / 32;
  const uint8_t* blocks = static_cast<const uint8_t*>(w.data) + r * groups * 16;
  const uint8_t* scales = w.scales + r * groups;
#if defined(LAZARUS_AVX2_MATH)
  if (use_avx2()) {
    switch (nt) {
      case 1: return row_dots_mxfp4_avx2<1>(blocks, scales, groups, x, out);
      case 2: return row_dots_mxfp4_avx2<2>(blocks, scales, groups, x, out);
      case 3: return row_dots_mxfp4_avx2<3>(blocks, scales, groups, x, out);
      default: return row_dots_mxfp4_avx2<4>(blocks, scales, groups, x, out);
    }
  }
#endif
  row_dots_mxfp4_portable(blocks, scales, groups, x, nt, out);
}

#if defined(LAZARUS_AVX2_MATH)
// One bf16/fp16 row converted to fp32 (exact), for rows applied to many tokens.
template <typename F>
LZ_TARGET_AVX2 void convert_row_avx2(const F* row, int64_t cols, float* out) {
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) _mm256_storeu_ps(out + c, simd::load8(row + c));
  for (; c < cols; ++c) out[c] = to_float(row[c]);
}
#endif

// The token rows a matrix-vector product reads, prepared once per product: x[x_rows ? x_rows[i] : i] as fp32
// (for MXFP4 with AVX2 in permute_for_mxfp4's order), or for an MXFP4 weight with `int16` set quantised by
// quantize_for_mxfp4 too (when every row is finite; else the fp32 form alone, so inf and NaN propagate as in
// fp32). The fp32 form is always there: an MXFP4 row with a NaN scale runs the fp32 kernel.
struct TokenRows {
  std::vector<const float*> f32;
  std::vector<float> permuted;
  std::vector<const int16_t*> q;
  std::vector<const uint16_t*> u;
  std::vector<int16_t> q_data;
  std::vector<uint16_t> u_data;

  bool quantized() const { return !q.empty(); }

  void prepare(const StoredMatrix& w, const float* x, const int64_t* x_rows, int64_t n, bool int16) {
    const auto row = [&](int64_t i) { return x + (x_rows ? x_rows[i] : i) * w.cols; };
    f32.assign(static_cast<size_t>(n), nullptr);
    q.clear();
    u.clear();
    if (w.format != Storage::kMXFP4 || !use_avx2()) {
      for (int64_t i = 0; i < n; ++i) f32[i] = row(i);
      return;
    }
    permuted.resize(static_cast<size_t>(n * w.cols));
    for (int64_t i = 0; i < n; ++i) {
      permute_for_mxfp4(row(i), w.cols, permuted.data() + i * w.cols);
      f32[i] = permuted.data() + i * w.cols;
    }
    if (!int16) return;
    const int64_t groups = w.cols / 32;
    q_data.resize(static_cast<size_t>(n * w.cols));
    u_data.resize(static_cast<size_t>(n * groups));
    for (int64_t i = 0; i < n; ++i)
      if (!quantize_for_mxfp4(row(i), w.cols, q_data.data() + i * w.cols, u_data.data() + i * groups)) return;
    for (int64_t i = 0; i < n; ++i) {
      q.push_back(q_data.data() + i * w.cols);
      u.push_back(u_data.data() + i * groups);
    }
  }
};

// y[i * ldy + (r - r0)] = dot(row r, x[i]) for rows [r0, r1) and the n token rows x[0..n). A stored row (MXFP4,
// bf16, fp16) met by more than kMaxTokens fp32 tokens is decoded once into an fp32 row buffer (MXFP4: the same
// permuted order as x) instead of once per pass of kMaxTokens tokens; quantised tokens run the int16 kernel in
// passes of kMaxTokens, each decoding the row in registers.
template <typename F>
void rows_times_tokens(const StoredMatrix& w, int64_t r0, int64_t r1, const TokenRows& x, int64_t n, int64_t t_first,
                       float* y, int64_t ldy) {
  float out[kMaxTokens];
#if defined(LAZARUS_AVX2_MATH)
  if constexpr (std::is_same<F, uint8_t>::value) {
    if (x.quantized()) {
      const int64_t groups = w.cols / 32;
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* blocks = static_cast<const uint8_t*>(w.data) + r * groups * 16;
        const uint8_t* scales = w.scales + r * groups;
        const bool nan_scale = std::memchr(scales, 0xFF, static_cast<size_t>(groups)) != nullptr;
        for (int64_t t0 = 0; t0 < n; t0 += kMaxTokens) {
          const int nt = static_cast<int>(std::min<int64_t>(kMaxTokens, n - t0));
          const int16_t* const* q = x.q.data() + t_first + t0;
          const uint16_t* const* u = x.u.data() + t_first + t0;
          if (nan_scale) {
            row_dots<uint8_t>(w, r, x.f32.data() + t_first + t0, nt, out);
          } else {
            switch (nt) {
              case 1: row_dots_mxfp4_q16_avx2<1>(blocks, scales, groups, q, u, out); break;
              case 2: row_dots_mxfp4_q16_avx2<2>(blocks, scales, groups, q, u, out); break;
              case 3: row_dots_mxfp4_q16_avx2<3>(blocks, scales, groups, q, u, out); break;
              default: row_dots_mxfp4_q16_avx2<4>(blocks, scales, groups, q, u, out); break;
            }
          }
          for (int i = 0; i < nt; ++i) y[(t0 + i) * ldy + (r - r0)] = out[i];
        }
      }
      return;
    }
  }
#endif
  const float* const* xs = x.f32.data() + t_first;
  std::vector<float> decoded;
#if defined(LAZARUS_AVX2_MATH)
  if (!std::is_same<F, float>::value && n > kMaxTokens && use_avx2()) decoded.resize(static_cast<size_t>(w.cols));
#endif
  const StoredMatrix row_buffer{Storage::kF32, decoded.data(), nullptr, 1, w.cols};
  for (int64_t r = r0; r < r1; ++r) {
#if defined(LAZARUS_AVX2_MATH)
    if (!decoded.empty()) {
      if constexpr (std::is_same<F, uint8_t>::value) {
        const int64_t groups = w.cols / 32;
        decode_row_mxfp4_avx2(static_cast<const uint8_t*>(w.data) + r * groups * 16, w.scales + r * groups, groups,
                              decoded.data());
      } else {
        convert_row_avx2(static_cast<const F*>(w.data) + r * w.cols, w.cols, decoded.data());
      }
    }
#endif
    for (int64_t t0 = 0; t0 < n; t0 += kMaxTokens) {
      const int nt = static_cast<int>(std::min<int64_t>(kMaxTokens, n - t0));
      if (decoded.empty()) {
        row_dots<F>(w, r, xs + t0, nt, out);
      } else {
        row_dots<float>(row_buffer, 0, xs + t0, nt, out);
      }
      for (int i = 0; i < nt; ++i) y[(t0 + i) * ldy + (r - r0)] = out[i];
    }
  }
}

void rows_times_tokens_any(const StoredMatrix& w, int64_t r0, int64_t r1, const TokenRows& x, int64_t n,
                           int64_t t_first, float* y, int64_t ldy) {
  switch (w.format) {
    case Storage::kBF16: return rows_times_tokens<bf16_t>(w, r0, r1, x, n, t_first, y, ldy);
    case Storage::kF16: return rows_times_tokens<f16_t>(w, r0, r1, x, n, t_first, y, ldy);
    case Storage::kMXFP4: return rows_times_tokens<uint8_t>(w, r0, r1, x, n, t_first, y, ldy);
    default: return rows_times_tokens<float>(w, r0, r1, x, n, t_first, y, ldy);
  }
}

// stored_matvec_and_shrink as work items for one OpenMP loop: kRowsPerItem rows of the base, or (expert, first
// rank row) of the shrink. Built before the loop; prepare_inputs() reads the input rows, so a plan whose inputs
// an earlier stage writes is prepared after that stage.
class MatvecShrinkPlan {
 public:
  MatvecShrinkPlan(const MatvecProblem& base, const ShrinkProblem& shrink) : base_(base), shrink_(shrink) {
    if (base.w.rows > 0 && base.n > 0) base_items_ = (base.w.rows + kRowsPerItem - 1) / kRowsPerItem;
    if (shrink.rank > 0 && shrink.experts > 0) {
      for (int64_t e = 0; e < shrink.experts; ++e) {
        const int64_t n = shrink.offsets[e + 1] - shrink.offsets[e];
        if (n == 0 || n > shrink.max_pairs) continue;
        for (int64_t j0 = 0; j0 < shrink.rank; j0 += kRowsPerItem) items_.emplace_back(e, j0);
      }
    }
  }

  int64_t items() const { return base_items_ + static_cast<int64_t>(items_.size()); }

  void prepare_inputs() {
    if (base_items_) base_rows_.prepare(base_.w, base_.x, base_.x_rows, base_.n, base_.int16);
    if (!items_.empty()) pair_rows_.prepare(shrink_.b, shrink_.inp, shrink_.rows, shrink_.offsets[shrink_.experts],
                                            false);
  }

  void run(int64_t it) const {
    if (it < base_items_) {
      const int64_t r0 = it * kRowsPerItem;
      rows_times_tokens_any(base_.w, r0, std::min(base_.w.rows, r0 + kRowsPerItem), base_rows_, base_.n, 0,
                            base_.y + r0, base_.ldy);
      return;
    }
    const int64_t e = items_[it - base_items_].first, j0 = items_[it - base_items_].second;
    const int64_t p0 = shrink_.offsets[e], n = shrink_.offsets[e + 1] - p0, rank = shrink_.rank;
    // Expert e's factor rows j0.. of the [experts * rank, cols] matrix, written to s[p0.., j0..].
    rows_times_tokens_any(shrink_.b, e * rank + j0, e * rank + std::min(rank, j0 + kRowsPerItem), pair_rows_, n, p0,
                          shrink_.s + p0 * rank + j0, rank);
  }

 private:
  MatvecProblem base_;
  ShrinkProblem shrink_;
  int64_t base_items_ = 0;
  std::vector<std::pair<int64_t, int64_t>> items_;
  TokenRows base_rows_, pair_rows_;
};

// Column block b (kCols columns of I) of overlay_gate_up: every pair's expand, bias and activation there.
template <typename F>
void gate_up_block(const OverlayGateUpArgsT<F>& a, int64_t b) {
  const int64_t I = a.inter, rg = a.rank_gate, ru = a.rank_up, r = rg + ru;
  const int64_t c0 = b * kCols, w = std::min(kCols, I - c0);
  float g[kTile][kCols], u[kTile][kCols];
  for (int64_t e = 0; e < a.experts; ++e) {
    for (int64_t p0 = a.offsets[e]; p0 < a.offsets[e + 1]; p0 += kTile) {
      const int64_t n = std::min(kTile, a.offsets[e + 1] - p0);
      const float* sg[kTile];
      const float* su[kTile];
      for (int64_t q = 0; q < n; ++q) {
        const int64_t t = a.pair_token[p0 + q];
        const float* base = a.gu0 + t * 2 * I + c0;
        std::memcpy(g[q], base, sizeof(float) * w);
        std::memcpy(u[q], base + I, sizeof(float) * w);
        if (a.bias_gate) {
          const F* bg = a.bias_gate + e * I + c0;
          for (int64_t c = 0; c < w; ++c) g[q][c] += to_float(bg[c]);
        }
        if (a.bias_up) {
          const F* bu = a.bias_up + e * I + c0;
          for (int64_t c = 0; c < w; ++c) u[q][c] += to_float(bu[c]);
        }
        sg[q] = a.s_gu + (p0 + q) * r;
        su[q] = sg[q] + rg;
      }
      expand_tile(g, sg, n, a.at_gate + e * rg * I, rg, I, c0, w);
      expand_tile(u, su, n, a.at_up + e * ru * I, ru, I, c0, w);
      for (int64_t q = 0; q < n; ++q) {
        const int64_t p = p0 + q, t = a.pair_token[p];
        activate(g[q], u[q], w, a.activation, a.alpha, a.limit, a.pair_weight[p], a.h + p * I + c0,
                 a.hw + t * I + c0);
      }
    }
  }
}

// Column block b (kCols columns of H) of overlay_down.
template <typename F>
void down_block(const OverlayDownArgsT<F>& a, int64_t b) {
  const int64_t H = a.hidden, rd = a.rank_down;
  const int64_t c0 = b * kCols, w = std::min(kCols, H - c0);
  float acc[kTile][kCols];
  for (int64_t e = 0; e < a.experts; ++e) {
    for (int64_t p0 = a.offsets[e]; p0 < a.offsets[e + 1]; p0 += kTile) {
      const int64_t n = std::min(kTile, a.offsets[e + 1] - p0);
      const float* s[kTile];
      for (int64_t q = 0; q < n; ++q) {
        for (int64_t c = 0; c < w; ++c) acc[q][c] = a.bias_down ? to_float(a.bias_down[e * H + c0 + c]) : 0.0f;
        s[q] = a.s_d + (p0 + q) * rd;
      }
      expand_tile(acc, s, n, a.at_down + e * rd * H, rd, H, c0, w);
      for (int64_t q = 0; q < n; ++q) {
        const int64_t p = p0 + q;
        const float wt = a.pair_weight[p];
        float* yt = a.y + a.pair_token[p] * H + c0;
        for (int64_t c = 0; c < w; ++c) yt[c] += wt * acc[q][c];
      }
    }
  }
}

int64_t column_blocks(int64_t cols) { return (cols + kCols - 1) / kCols; }

}  // namespace

template <typename F>
void overlay_gate_up_cpu(const OverlayGateUpArgsT<F>& a) {
  std::memset(a.hw, 0, sizeof(float) * a.tokens * a.inter);
  const int64_t blocks = column_blocks(a.inter);
  LZ_OMP(parallel for schedule(static))
  for (int64_t b = 0; b < blocks; ++b) gate_up_block(a, b);
}

template <typename F>
void overlay_down_cpu(const OverlayDownArgsT<F>& a) {
  const int64_t blocks = column_blocks(a.hidden);
  LZ_OMP(parallel for schedule(static))
  for (int64_t b = 0; b < blocks; ++b) down_block(a, b);
}

template void overlay_gate_up_cpu<float>(const OverlayGateUpArgsT<float>&);
template void overlay_gate_up_cpu<bf16_t>(const OverlayGateUpArgsT<bf16_t>&);
template void overlay_gate_up_cpu<f16_t>(const OverlayGateUpArgsT<f16_t>&);
template void overlay_down_cpu<float>(const OverlayDownArgsT<float>&);
template void overlay_down_cpu<bf16_t>(const OverlayDownArgsT<bf16_t>&);
template void overlay_down_cpu<f16_t>(const OverlayDownArgsT<f16_t>&);

void stored_matvec_and_shrink_cpu(const MatvecProblem& base, const ShrinkProblem& shrink) {
  // One dynamic loop over both kinds of item, so a small batch is one parallel region and a descheduled
  // thread's share is taken by the others.
  MatvecShrinkPlan plan(base, shrink);
  plan.prepare_inputs();
  const int64_t n_items = plan.items();
  LZ_OMP(parallel for schedule(dynamic) if (n_items > 1))
  for (int64_t it = 0; it < n_items; ++it) plan.run(it);
}

void stored_matvec_cpu(const StoredMatrix& w, const float* x, const int64_t* x_rows, int64_t n, float* y,
                       int64_t ldy, bool int16) {
  stored_matvec_and_shrink_cpu(MatvecProblem{w, x, x_rows, n, y, ldy, int16}, ShrinkProblem{});
}

void overlay_shrink_cpu(const StoredMatrix& b, int64_t rank, const int64_t* offsets, int64_t experts,
                        int64_t max_pairs, const float* inp, const int64_t* rows, float* s) {
  stored_matvec_and_shrink_cpu(MatvecProblem{}, ShrinkProblem{b, rank, offsets, experts, max_pairs, inp, rows, s});
}

template <typename F>
void overlay_moe_small_cpu(const SmallForwardT<F>& a) {
  const int64_t T = a.tokens, K = a.top_k, P = T * K, E = a.experts, H = a.hidden, I = a.inter;
  const int64_t rgu = a.rank_gate + a.rank_up, rd = a.rank_down;
  // Pairs sorted by expert (a stable counting sort: pair order within an expert follows the slots).
  std::vector<int64_t> offsets(static_cast<size_t>(E + 1), 0), pair_token(static_cast<size_t>(P));
  std::vector<float> pair_weight(static_cast<size_t>(P));
  for (int64_t p = 0; p < P; ++p) ++offsets[a.topk_ids[p] + 1];
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
  for (int64_t slot = 0; slot < P; ++slot) {
    const int64_t p = cursor[a.topk_ids[slot]]++;
    pair_token[p] = slot / K;
    pair_weight[p] = a.topk_weights[slot];
  }
  std::vector<float> gu0(static_cast<size_t>(T * 2 * I)), s_gu(static_cast<size_t>(P * rgu)),
      h(static_cast<size_t>(P * I)), hw(static_cast<size_t>(T * I)), s_d(static_cast<size_t>(P * rd));
  MatvecShrinkPlan gate_up_products(
      MatvecProblem{a.base_gate_up, a.x, nullptr, T, gu0.data(), 2 * I, a.int16},
      ShrinkProblem{a.b_gate_up, rgu, offsets.data(), E, P, a.x, pair_token.data(), s_gu.data()});
  MatvecShrinkPlan down_products(MatvecProblem{a.base_down, hw.data(), nullptr, T, a.y, H, a.int16},
                                 ShrinkProblem{a.b_down, rd, offsets.data(), E, P, h.data(), nullptr, s_d.data()});
  const OverlayGateUpArgsT<F> gate_up{gu0.data(), s_gu.data(), pair_token.data(), pair_weight.data(), offsets.data(),
                                      a.at_gate, a.at_up, a.bias_gate, a.bias_up, T, I, P, E, a.rank_gate, a.rank_up,
                                      a.activation, a.alpha, a.limit, h.data(), hw.data()};
  const OverlayDownArgsT<F> down{s_d.data(), pair_token.data(), pair_weight.data(), offsets.data(), a.at_down,
                                 a.bias_down, T, H, P, E, rd, a.y};
  gate_up_products.prepare_inputs();
  const int64_t n1 = gate_up_products.items(), n3 = down_products.items();
  const int64_t gate_up_blocks = column_blocks(I), down_blocks = column_blocks(H);
  // One parallel region for the whole forward: each stage is a worksharing loop whose implicit barrier hands
  // its output to the next (a region per stage waits for every thread to wake, a descheduled one included).
  LZ_OMP(parallel)
  {
    LZ_OMP(for schedule(dynamic))
    for (int64_t it = 0; it < n1; ++it) gate_up_products.run(it);
    LZ_OMP(for schedule(dynamic))
    for (int64_t b = 0; b < gate_up_blocks; ++b) gate_up_block(gate_up, b);
    LZ_OMP(single)
    down_products.prepare_inputs();
    LZ_OMP(for schedule(dynamic))
    for (int64_t it = 0; it < n3; ++it) down_products.run(it);
    LZ_OMP(for schedule(dynamic))
    for (int64_t b = 0; b < down_blocks; ++b) down_block(down, b);
  }
}

template void overlay_moe_small_cpu<float>(const SmallForwardT<float>&);
template void overlay_moe_small_cpu<bf16_t>(const SmallForwardT<bf16_t>&);
template void overlay_moe_small_cpu<f16_t>(const SmallForwardT<f16_t>&);

namespace detail {

void overlay_gate_up_portable_cpu(const OverlayGateUpArgs& a, const int64_t* slot_pair, const int64_t* slot_expert,
                                  int64_t top_k) {
  for (int64_t t = 0; t < a.tokens; ++t)
    for (int64_t c = 0; c < a.inter; ++c) a.hw[t * a.inter + c] = overlay::gate_up_column(a, slot_pair, slot_expert, top_k, t, c);
}

void overlay_down_portable_cpu(const OverlayDownArgs& a, const int64_t* slot_pair, const int64_t* slot_expert,
                               int64_t top_k) {
  for (int64_t t = 0; t < a.tokens; ++t)
    for (int64_t c = 0; c < a.hidden; ++c) a.y[t * a.hidden + c] += overlay::down_column(a, slot_pair, slot_expert, top_k, t, c);
}

}  // namespace detail
}  // namespace lazarus
