// Why: the CPU overlay MoE kernels, reading every weight in its stored precision (fp32, bf16, fp16, MXFP4)
// and computing in fp32 registers. The fused expand + activation + weighted reduction groups pairs by
// expert so each expand row A[e]^T[j, cols] is loaded once per tile of 4 pairs; threads own column blocks,
// so the per-token sums need no atomics and are deterministic. A small batch (at most kRowExpandPairs pairs)
// runs the expand expert by expert instead, each factor matrix streamed over full rows, with the same bits. The
// matrix-vector kernels (base GEMV of small batches, grouped shrink) decode a weight row in registers and apply
// it to up to 4 tokens at once (one token: 4 rows side by side).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
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
constexpr int64_t kRowsPerItem = 16;  // weight rows per OpenMP work item of the matrix-vector kernels (shrink)
// Base rows per work item: long runs keep each thread's stream contiguous for the prefetchers (a 2880-column
// MXFP4 row is 1.5 KB), and 5760 rows still make 90 items for the dynamic schedule to balance.
constexpr int64_t kBaseRowsPerItem = 64;
constexpr int64_t kRowsAhead = 16;      // software prefetch distance of the expand kernel, in factor rows
constexpr int64_t kStreamAhead = 2048;   // software prefetch distance along a streamed weight row (GEMV kernels)

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
// Register-blocked AVX2/FMA micro-kernel: N pairs x 8V columns stay in N*V ymm accumulators for the whole rank
// loop, so each expand row is loaded (and converted to fp32) once per N pairs. Each accumulator is one FMA
// chain (4 cycles of latency, 2 FMA ports): N*V >= 8 chains keep the ports busy, so few pairs take more columns.
template <int N, int V, typename F>
LZ_TARGET_AVX2 int64_t expand_columns_avx2(float (*acc)[kCols], const float* const* s, const F* at, int64_t rank,
                                           int64_t ld, int64_t c0, int64_t c, int64_t w) {
  for (; c + 8 * V <= w; c += 8 * V) {
    __m256 v[N][V];
    for (int q = 0; q < N; ++q)
      for (int k = 0; k < V; ++k) v[q][k] = _mm256_loadu_ps(acc[q] + c + 8 * k);
    const F* col = at + c0 + c;
    for (int64_t j = 0; j < rank; ++j) {
      // The rank rows are `rank` interleaved streams (row stride ld), each read in short runs: too many for
      // the hardware prefetcher. Fetch the run kRowsAhead rows further on (past the last row: the next step's
      // run of the first rows), a line per 64 bytes: DRAM latency when few pairs share a pass.
      const F* ahead = j + kRowsAhead < rank ? col + (j + kRowsAhead) * ld : col + 8 * V + (j + kRowsAhead - rank) * ld;
      for (int k = 0; k < V; k += 64 / (8 * static_cast<int>(sizeof(F))))
        _mm_prefetch(reinterpret_cast<const char*>(ahead + 8 * k), _MM_HINT_T0);
      __m256 r[V];
      for (int k = 0; k < V; ++k) r[k] = simd::load8(col + j * ld + 8 * k);
      for (int q = 0; q < N; ++q) {
        const __m256 b = _mm256_broadcast_ss(s[q] + j);
        for (int k = 0; k < V; ++k) v[q][k] = _mm256_fmadd_ps(b, r[k], v[q][k]);
      }
    }
    for (int q = 0; q < N; ++q)
      for (int k = 0; k < V; ++k) _mm256_storeu_ps(acc[q] + c + 8 * k, v[q][k]);
  }
  return c;
}

template <int N, typename F>
LZ_TARGET_AVX2 void expand_tile_avx2(float (*acc)[kCols], const float* const* s, const F* at, int64_t rank,
                                     int64_t ld, int64_t c0, int64_t w) {
  constexpr int V = N == 1 ? 8 : N == 2 ? 4 : 2;
  int64_t c = expand_columns_avx2<N, V>(acc, s, at, rank, ld, c0, 0, w);
  if (V > 2) c = expand_columns_avx2<N, 2>(acc, s, at, rank, ld, c0, c, w);
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

#if defined(LAZARUS_AVX2_MATH)
// acc[q][c] += sum_j s[q][j] * at[j * ld + c] for q < N pairs, c < w: the rank rows are read R at a time over the
// full width (R contiguous streams of w values, which the hardware prefetcher follows), each row converted once
// per N pairs; the accumulators stay in L1. Per column the FMAs run in j order, as in expand_columns_avx2, so
// both give the same bits.
template <int N, int R, typename F>
LZ_TARGET_AVX2 void expand_rows_pass_avx2(float* const* acc, const float* const* s, const F* rows, int64_t ld,
                                          int64_t j, int64_t w) {
  int64_t c = 0;
  for (; c + 8 <= w; c += 8) {
    __m256 r[R];
    for (int k = 0; k < R; ++k) r[k] = simd::load8(rows + k * ld + c);
    for (int q = 0; q < N; ++q) {
      __m256 v = _mm256_loadu_ps(acc[q] + c);
      for (int k = 0; k < R; ++k) v = _mm256_fmadd_ps(_mm256_broadcast_ss(s[q] + j + k), r[k], v);
      _mm256_storeu_ps(acc[q] + c, v);
    }
  }
  for (; c < w; ++c)
    for (int q = 0; q < N; ++q) {
      float v = acc[q][c];
      for (int k = 0; k < R; ++k) v = std::fma(s[q][j + k], to_float(rows[k * ld + c]), v);
      acc[q][c] = v;
    }
}

template <int N, typename F>
LZ_TARGET_AVX2 void expand_rows_avx2(float* const* acc, const float* const* s, const F* at, int64_t rank, int64_t ld,
                                     int64_t w) {
  constexpr int R = N == 1 ? 8 : 4;  // N accumulators + R rows + the broadcast in 16 ymm registers
  int64_t j = 0;
  for (; j + R <= rank; j += R) expand_rows_pass_avx2<N, R>(acc, s, at + j * ld, ld, j, w);
  for (; j < rank; ++j) expand_rows_pass_avx2<N, 1>(acc, s, at + j * ld, ld, j, w);
}

// expand_rows_avx2 for n <= kTile pairs.
template <typename F>
void expand_rows(float* const* acc, const float* const* s, int64_t n, const F* at, int64_t rank, int64_t ld,
                 int64_t w) {
  switch (n) {
    case 1: return expand_rows_avx2<1>(acc, s, at, rank, ld, w);
    case 2: return expand_rows_avx2<2>(acc, s, at, rank, ld, w);
    case 3: return expand_rows_avx2<3>(acc, s, at, rank, ld, w);
    default: return expand_rows_avx2<4>(acc, s, at, rank, ld, w);
  }
}
#endif

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
// Each token keeps V accumulators (V FMA chains over 8V columns per step): one or two tokens need 8 or 4 to
// hide the FMA latency, more tokens give enough chains with 2.
template <int NT, typename F>
LZ_TARGET_AVX2 void row_dots_avx2(const F* w, int64_t cols, const float* const* x, float* out) {
  constexpr int V = NT == 1 ? 8 : NT == 2 ? 4 : 2;
  __m256 acc[NT][V];
  for (int t = 0; t < NT; ++t)
    for (int k = 0; k < V; ++k) acc[t][k] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 * V <= cols; c += 8 * V) {
    for (int k = 0; k < V; k += 64 / (8 * static_cast<int>(sizeof(F))))
      _mm_prefetch(reinterpret_cast<const char*>(w + c + 8 * k) + kStreamAhead, _MM_HINT_T0);
    __m256 wv[V];
    for (int k = 0; k < V; ++k) wv[k] = simd::load8(w + c + 8 * k);
    for (int t = 0; t < NT; ++t)
      for (int k = 0; k < V; ++k) acc[t][k] = _mm256_fmadd_ps(wv[k], _mm256_loadu_ps(x[t] + c + 8 * k), acc[t][k]);
  }
  for (; c + 8 <= cols; c += 8) {
    const __m256 wv = simd::load8(w + c);
    for (int t = 0; t < NT; ++t) acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[t] + c), acc[t][0]);
  }
  for (int t = 0; t < NT; ++t) {
    float tail = 0.0f;
    for (int64_t k = c; k < cols; ++k) tail += to_float(w[k]) * x[t][k];
    __m256 sum = acc[t][0];
    for (int k = 1; k < V; ++k) sum = _mm256_add_ps(sum, acc[t][k]);
    out[t] = simd::hsum(sum) + tail;
  }
}

// out[i] = dot(row i, x) for kDotRows consecutive rows (row stride ld) and one token: the rows are read side by
// side, kDotRows streams for the prefetchers, two FMA chains each; x is loaded once per step for all of them.
constexpr int kDotRows = 4;
template <typename F>
LZ_TARGET_AVX2 void row_group_dots_avx2(const F* w, int64_t ld, const float* x, float* out) {
  const int64_t cols = ld;
  __m256 acc[kDotRows][2];
  for (int i = 0; i < kDotRows; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
    for (int i = 0; i < kDotRows; ++i) {
      acc[i][0] = _mm256_fmadd_ps(simd::load8(w + i * ld + c), x0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(simd::load8(w + i * ld + c + 8), x1, acc[i][1]);
    }
  }
  for (; c + 8 <= cols; c += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + c);
    for (int i = 0; i < kDotRows; ++i) acc[i][0] = _mm256_fmadd_ps(simd::load8(w + i * ld + c), x0, acc[i][0]);
  }
  for (int i = 0; i < kDotRows; ++i) {
    float tail = 0.0f;
    for (int64_t k = c; k < cols; ++k) tail += to_float(w[i * ld + k]) * x[k];
    out[i] = simd::hsum(_mm256_add_ps(acc[i][0], acc[i][1])) + tail;
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

#endif

// Token rows of the integer MXFP4 kernel (row_dots_mxfp4_q8_avx2), per 32-element block b with largest |x| = m:
// - kFixed16: k = 6 - e where m = f * 2^e, f in [0.5, 1) (k = 0 for an all-zero block, at most kMaxShift = 140,
//   so that the half scale 2^-(k+9) stays an fp32 subnormal), so |x| * 2^k < 64; N = round(x * 2^(k+8)) (|N| <=
//   16384), carried as two int8 terms N = 256 * hi + lo, hi = floor((N + 128) / 256) in [-64, 64], lo in [-128,
//   127]; the block's scale is 2^-(k+8). Each element is off by at most 2^-14 of m (2^-149 when m < 2^-135).
// - kInt8: scale d = m / 127 (fp32), q = round(x / d) in [-127, 127]; each element off by at most m / 254.
// Stored per pair of blocks (2p, 2p+1), in the byte order the kernel's two nibble registers give the weights:
// [even elements of 2p | even of 2p+1][odd of 2p | odd of 2p+1] for each term (hi first), so one 32-byte load
// of codes meets one 32-byte load of tokens. half_scale[b] = scale / 2 (the code table holds twice each E2M1
// value), padded with zeros to a multiple of 8 blocks; corr[8p + l] = 12 * (sum of the values of int32 lane l),
// the offset the table's +12 adds (lanes 0-3: elements 8l..8l+7 of block 2p, lanes 4-7: of block 2p+1; in
// kFixed16 the value is N). An odd block count gets a zero pad block. Returns false (nothing usable) when the
// row holds inf or NaN.
constexpr int kCodeOffset = 12;
constexpr int kMaxShift = 140;

int64_t q8_pair_bytes(int mode) { return mode == kTokensFixed16 ? 128 : 64; }
int64_t q8_scale_slots(int64_t groups) { return (groups + 7) / 8 * 8; }

// One block's integer values n[32] (N in kFixed16, q in kInt8) and its half scale; false when it holds inf or
// NaN. The portable form; quantize_block_avx2 computes the same values.
bool quantize_block(const float* xb, int mode, int32_t* n, float* half_scale) {
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
LZ_TARGET_AVX2 bool quantize_block_avx2(const float* xb, int mode, int32_t* n, float* half_scale) {
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

bool quantize_for_mxfp4_q8(const float* x, int64_t cols, int mode, int8_t* q, float* half_scale, int32_t* corr) {
  const int64_t groups = cols / 32, pairs = (groups + 1) / 2, pair_bytes = q8_pair_bytes(mode);
  std::memset(q, 0, static_cast<size_t>(pairs * pair_bytes));
  std::memset(corr, 0, sizeof(int32_t) * static_cast<size_t>(pairs * 8));
  std::fill(half_scale, half_scale + q8_scale_slots(groups), 0.0f);
  int32_t n[32];
  for (int64_t g = 0; g < groups; ++g) {
#if defined(LAZARUS_AVX2_MATH)  // callers checked the CPU (the integer kernel is AVX2 only)
    const bool ok = quantize_block_avx2(x + 32 * g, mode, n, half_scale + g);
#else
    const bool ok = quantize_block(x + 32 * g, mode, n, half_scale + g);
#endif
    if (!ok) return false;
    int8_t* pair = q + (g / 2) * pair_bytes;
    int32_t* lanes = corr + (g / 2) * 8 + (g % 2) * 4;
    const int half = static_cast<int>(g % 2) * 16;
    for (int i = 0; i < 32; ++i) {
      const int at = 32 * (i % 2) + half + i / 2;
      if (mode == kTokensFixed16) {
        const int32_t hi = (n[i] + 128) >> 8;  // floor((N + 128) / 256): lo = N - 256 hi in [-128, 127]
        pair[at] = static_cast<int8_t>(hi);
        pair[64 + at] = static_cast<int8_t>(n[i] - 256 * hi);
      } else {
        pair[at] = static_cast<int8_t>(n[i]);
      }
      lanes[i / 8] += kCodeOffset * n[i];
    }
  }
  return true;
}

struct Q8Row {
  const int8_t* q;
  const float* half_scale;
  const int32_t* corr;
};

#if defined(LAZARUS_AVX2_MATH)
// True when a scale byte is 0xFF (NaN) or 0 (2^-127, which the kernel's exponent shift would read as 0): such a
// weight row runs the fp32 kernel.
LZ_TARGET_AVX2 inline bool special_scales(const uint8_t* s, int64_t n) {
  if (n < 32) {
    for (int64_t i = 0; i < n; ++i)
      if (s[i] == 0 || s[i] == 0xFF) return true;
    return false;
  }
  const __m256i zero = _mm256_setzero_si256(), ones = _mm256_set1_epi8(-1);
  __m256i hit = zero;
  const auto check = [&](int64_t i) LZ_TARGET_AVX2 {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    hit = _mm256_or_si256(hit, _mm256_or_si256(_mm256_cmpeq_epi8(v, zero), _mm256_cmpeq_epi8(v, ones)));
  };
  for (int64_t i = 0; i + 32 <= n; i += 32) check(i);
  check(n - 32);  // the last 32 bytes, overlapping the loop's last load
  return !_mm256_testz_si256(hit, hit);
}

// One MXFP4 row against NT token rows quantised by quantize_for_mxfp4_q8, two blocks per step: the 32 code bytes
// of blocks (2p, 2p+1) split into low and high nibbles (one register each), a byte shuffle maps each code to
// 2 * E2M1 + 12 as uint8 (0..24), vpmaddubsw multiplies with the int8 tokens and adds pairs (|sum| <= 12288 in
// int16 over both registers), vpmaddwd sums to int32 lanes (lanes 0-3 block 2p, 4-7 block 2p+1; kFixed16 forms
// 256 * hi + lo), the +12 offset is subtracted exactly (corr), and one fp32 FMA per pair applies each block's
// weight scale x token scale (2^(s-127) from the scale byte shifted into an exponent, times half_scale: exact
// powers of two in kFixed16). Every integer step is exact. The decode is shared by the NT tokens.
template <int NT, int Mode>
LZ_TARGET_AVX2 void row_dots_mxfp4_q8_avx2(const uint8_t* blocks, const uint8_t* scales, int64_t groups,
                                           const Q8Row* const* tok, float* out) {
  constexpr int64_t kPairBytes = Mode == kTokensFixed16 ? 128 : 64;
  const __m256i table = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                         12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), k256 = _mm256_set1_epi16(256);
  const __m256i spread[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                             _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
  // Two accumulators per token (even and odd pairs): one FMA chain would wait on its latency.
  __m256 acc[NT][2];
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  const auto pair = [&](__m256i codes, int64_t p, const __m256* scale, int k) LZ_TARGET_AVX2 {
    const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(codes, nibble));
    const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(codes, 4), nibble));
    for (int t = 0; t < NT; ++t) {
      const __m256i* xq = reinterpret_cast<const __m256i*>(tok[t]->q + p * kPairBytes);
      const __m256i prod = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xq)),
                                            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xq + 1)));
      __m256i sum;
      if constexpr (Mode == kTokensFixed16) {
        const __m256i low = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xq + 2)),
                                             _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xq + 3)));
        sum = _mm256_add_epi32(_mm256_madd_epi16(prod, k256), _mm256_madd_epi16(low, ones));
      } else {
        sum = _mm256_madd_epi16(prod, ones);
      }
      sum = _mm256_sub_epi32(sum, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tok[t]->corr + 8 * p)));
      acc[t][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale[t], acc[t][k]);
    }
  };
  // The 8 weight scales 2^(s-127) of blocks g..g+7 (as exponent bits) times each token's half scales.
  const auto group_scales = [&](__m256i bits, int64_t g, __m256* s) LZ_TARGET_AVX2 {
    const __m256 w = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 23));
    for (int t = 0; t < NT; ++t) s[t] = _mm256_mul_ps(w, _mm256_loadu_ps(tok[t]->half_scale + g));
  };
  int64_t g = 0;
  __m256 s[NT], sp[NT];
  for (; g + 8 <= groups; g += 8) {
    // The code bytes stream from DRAM at T=1: fetch kStreamAhead bytes ahead (past the row's end into the next
    // row), which the hardware prefetcher does not do across 4 KB pages.
    _mm_prefetch(reinterpret_cast<const char*>(blocks + 16 * g) + kStreamAhead, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(blocks + 16 * g) + kStreamAhead + 64, _MM_HINT_T0);
    group_scales(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + g))), g, s);
    for (int i = 0; i < 4; ++i) {
      for (int t = 0; t < NT; ++t) sp[t] = _mm256_permutevar8x32_ps(s[t], spread[i]);
      pair(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks + 16 * (g + 2 * i))), g / 2 + i, sp, i & 1);
    }
  }
  if (g < groups) {  // the last 1..7 blocks: a zero-padded group of scales, an odd block's pair half-loaded
    alignas(32) int32_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = g; i < groups; ++i) tail[i - g] = scales[i];
    group_scales(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail)), g, s);
    for (int i = 0; g + 2 * i < groups; ++i) {
      const uint8_t* at = blocks + 16 * (g + 2 * i);
      const __m256i codes = g + 2 * i + 1 < groups
                                ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))
                                : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
      for (int t = 0; t < NT; ++t) sp[t] = _mm256_permutevar8x32_ps(s[t], spread[i]);
      pair(codes, g / 2 + i, sp, i & 1);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = simd::hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
}
#endif

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
// (for MXFP4 with AVX2 in permute_for_mxfp4's order), and for an MXFP4 weight with an integer token mode also
// quantised by quantize_for_mxfp4_q8 (when every row is finite; else the fp32 form alone, so inf and NaN
// propagate as in fp32). The fp32 form is always there: an MXFP4 row with a NaN or zero scale runs the fp32
// kernel.
struct TokenRows {
  std::vector<const float*> f32;
  std::vector<float> permuted;
  std::vector<Q8Row> q8;
  std::vector<const Q8Row*> q8_rows;
  std::vector<int8_t> q_data;
  std::vector<float> scale_data;
  std::vector<int32_t> corr_data;
  int mode = kTokensFp32;

  bool quantized() const { return !q8_rows.empty(); }

  void prepare(const StoredMatrix& w, const float* x, const int64_t* x_rows, int64_t n, int tokens) {
    const auto row = [&](int64_t i) { return x + (x_rows ? x_rows[i] : i) * w.cols; };
    f32.assign(static_cast<size_t>(n), nullptr);
    q8.clear();
    q8_rows.clear();
    mode = tokens;
    if (w.format != Storage::kMXFP4 || !use_avx2()) {
      for (int64_t i = 0; i < n; ++i) f32[i] = row(i);
      return;
    }
    permuted.resize(static_cast<size_t>(n * w.cols));
    for (int64_t i = 0; i < n; ++i) {
      permute_for_mxfp4(row(i), w.cols, permuted.data() + i * w.cols);
      f32[i] = permuted.data() + i * w.cols;
    }
    if (tokens == kTokensFp32) return;
    const int64_t groups = w.cols / 32, pairs = (groups + 1) / 2, qb = pairs * q8_pair_bytes(tokens);
    const int64_t slots = q8_scale_slots(groups);
    q_data.resize(static_cast<size_t>(n * qb));
    scale_data.resize(static_cast<size_t>(n * slots));
    corr_data.resize(static_cast<size_t>(n * pairs * 8));
    for (int64_t i = 0; i < n; ++i)
      if (!quantize_for_mxfp4_q8(row(i), w.cols, tokens, q_data.data() + i * qb, scale_data.data() + i * slots,
                                 corr_data.data() + i * pairs * 8))
        return;
    for (int64_t i = 0; i < n; ++i)
      q8.push_back(Q8Row{q_data.data() + i * qb, scale_data.data() + i * slots, corr_data.data() + i * pairs * 8});
    for (const Q8Row& r : q8) q8_rows.push_back(&r);
  }
};

#if defined(LAZARUS_AVX2_MATH)
template <int Mode>
LZ_TARGET_AVX2 void row_dots_q8(const uint8_t* blocks, const uint8_t* scales, int64_t groups, const Q8Row* const* q,
                                int nt, float* out) {
  switch (nt) {
    case 1: return row_dots_mxfp4_q8_avx2<1, Mode>(blocks, scales, groups, q, out);
    case 2: return row_dots_mxfp4_q8_avx2<2, Mode>(blocks, scales, groups, q, out);
    case 3: return row_dots_mxfp4_q8_avx2<3, Mode>(blocks, scales, groups, q, out);
    default: return row_dots_mxfp4_q8_avx2<4, Mode>(blocks, scales, groups, q, out);
  }
}
#endif

// y[i * ldy + (r - r0)] = dot(row r, x[i]) for rows [r0, r1) and the n token rows x[0..n). A stored row (MXFP4,
// bf16, fp16) met by more than kMaxTokens fp32 tokens is decoded once into an fp32 row buffer (MXFP4: the same
// permuted order as x) instead of once per pass of kMaxTokens tokens; quantised tokens run the integer kernel in
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
        const bool special = special_scales(scales, groups);
        for (int64_t t0 = 0; t0 < n; t0 += kMaxTokens) {
          const int nt = static_cast<int>(std::min<int64_t>(kMaxTokens, n - t0));
          if (special) {
            row_dots<uint8_t>(w, r, x.f32.data() + t_first + t0, nt, out);
          } else if (x.mode == kTokensFixed16) {
            row_dots_q8<kTokensFixed16>(blocks, scales, groups, x.q8_rows.data() + t_first + t0, nt, out);
          } else {
            row_dots_q8<kTokensInt8>(blocks, scales, groups, x.q8_rows.data() + t_first + t0, nt, out);
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
  int64_t r = r0;
#if defined(LAZARUS_AVX2_MATH)
  if constexpr (!std::is_same<F, uint8_t>::value) {
    if (n == 1 && use_avx2()) {  // one token: kDotRows rows at a time, kDotRows streams
      for (; r + kDotRows <= r1; r += kDotRows)
        row_group_dots_avx2(static_cast<const F*>(w.data) + r * w.cols, w.cols, xs[0], y + (r - r0));
    }
  }
#endif
  for (; r < r1; ++r) {
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

// stored_matvec_and_shrink as work items for one OpenMP loop: kBaseRowsPerItem rows of the base, or (expert, first
// rank row) of the shrink. Built before the loop; prepare_inputs() reads the input rows, so a plan whose inputs
// an earlier stage writes is prepared after that stage.
class MatvecShrinkPlan {
 public:
  MatvecShrinkPlan(const MatvecProblem& base, const ShrinkProblem& shrink) : base_(base), shrink_(shrink) {
    if (base.w.rows > 0 && base.n > 0) base_items_ = (base.w.rows + kBaseRowsPerItem - 1) / kBaseRowsPerItem;
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
    if (base_items_) base_rows_.prepare(base_.w, base_.x, base_.x_rows, base_.n, base_.token_mode);
    if (!items_.empty()) pair_rows_.prepare(shrink_.b, shrink_.inp, shrink_.rows, shrink_.offsets[shrink_.experts],
                                            kTokensFp32);
  }

  void run(int64_t it) const {
    if (it < base_items_) {
      const int64_t r0 = it * kBaseRowsPerItem;
      rows_times_tokens_any(base_.w, r0, std::min(base_.w.rows, r0 + kBaseRowsPerItem), base_rows_, base_.n, 0,
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

// ---- the expand stages of a small batch, expert by expert.
// gate_up_block and down_block read each expert's rank rows in kCols-column runs at row stride I (or H): with
// one or two pairs per expert that many short interleaved runs leave the factors' bytes waiting on DRAM. For at
// most kRowExpandPairs pairs (AVX2) the expand runs instead as work items of whole factor matrices, an expert's
// rank rows streamed over the full width (expand_rows) into per-pair buffers, then an epilogue by column block
// applies the bias, the activation and the weighted sums in the same pair order as the column blocks: the two
// forms give the same bits.
constexpr int64_t kRowExpandPairs = 64;

bool rows_expand(int64_t pairs) { return pairs <= kRowExpandPairs && use_avx2(); }

// The experts that have pairs, in order.
std::vector<int64_t> active_experts(const int64_t* offsets, int64_t experts) {
  std::vector<int64_t> active;
  for (int64_t e = 0; e < experts; ++e)
    if (offsets[e + 1] > offsets[e]) active.push_back(e);
  return active;
}

// A [P, cols] fp32 buffer, not initialised (every element is written before it is read).
struct PairBuffer {
  std::unique_ptr<float[]> data;
  PairBuffer(int64_t pairs, int64_t cols) : data(new float[static_cast<size_t>(std::max<int64_t>(1, pairs * cols))]) {}
  float* row(int64_t p, int64_t cols) const { return data.get() + p * cols; }
};

// overlay_gate_up as items (active expert, gate or up) then column blocks; items() and blocks() count them.
template <typename F>
class GateUpRows {
 public:
  explicit GateUpRows(const OverlayGateUpArgsT<F>& a)
      : a_(a), active_(active_experts(a.offsets, a.experts)), g_(a.pairs, a.inter), u_(a.pairs, a.inter) {}

  int64_t items() const { return 2 * static_cast<int64_t>(active_.size()); }
  int64_t blocks() const { return column_blocks(a_.inter); }

  // Each pair of the item's expert: its base product (gate or up half) + bias + A^T s, full width.
  void run_item(int64_t it) const {
#if defined(LAZARUS_AVX2_MATH)
    const int64_t e = active_[it / 2], I = a_.inter, rg = a_.rank_gate, ru = a_.rank_up;
    const bool up = it % 2 == 1;
    const F* bias = up ? a_.bias_up : a_.bias_gate;
    const F* at = up ? a_.at_up + e * ru * I : a_.at_gate + e * rg * I;
    for (int64_t p0 = a_.offsets[e]; p0 < a_.offsets[e + 1]; p0 += kTile) {
      const int64_t n = std::min(kTile, a_.offsets[e + 1] - p0);
      float* acc[kTile];
      const float* s[kTile];
      for (int64_t q = 0; q < n; ++q) {
        acc[q] = (up ? u_ : g_).row(p0 + q, I);
        std::memcpy(acc[q], a_.gu0 + a_.pair_token[p0 + q] * 2 * I + (up ? I : 0), sizeof(float) * I);
        if (bias)
          for (int64_t c = 0; c < I; ++c) acc[q][c] += to_float(bias[e * I + c]);
        s[q] = a_.s_gu + (p0 + q) * (rg + ru) + (up ? rg : 0);
      }
      expand_rows(acc, s, n, at, up ? ru : rg, I, I);
    }
#else
    (void)it;
#endif
  }

  void run_block(int64_t b) const {
    const int64_t I = a_.inter, c0 = b * kCols, w = std::min(kCols, I - c0);
    for (int64_t p = 0; p < a_.pairs; ++p)
      activate(g_.row(p, I) + c0, u_.row(p, I) + c0, w, a_.activation, a_.alpha, a_.limit, a_.pair_weight[p],
               a_.h + p * I + c0, a_.hw + a_.pair_token[p] * I + c0);
  }

 private:
  OverlayGateUpArgsT<F> a_;
  std::vector<int64_t> active_;
  PairBuffer g_, u_;
};

// overlay_down as items (active expert) then column blocks.
template <typename F>
class DownRows {
 public:
  explicit DownRows(const OverlayDownArgsT<F>& a) : a_(a), active_(active_experts(a.offsets, a.experts)), d_(a.pairs, a.hidden) {}

  int64_t items() const { return static_cast<int64_t>(active_.size()); }
  int64_t blocks() const { return column_blocks(a_.hidden); }

  void run_item(int64_t it) const {
#if defined(LAZARUS_AVX2_MATH)
    const int64_t e = active_[it], H = a_.hidden, rd = a_.rank_down;
    for (int64_t p0 = a_.offsets[e]; p0 < a_.offsets[e + 1]; p0 += kTile) {
      const int64_t n = std::min(kTile, a_.offsets[e + 1] - p0);
      float* acc[kTile];
      const float* s[kTile];
      for (int64_t q = 0; q < n; ++q) {
        acc[q] = d_.row(p0 + q, H);
        for (int64_t c = 0; c < H; ++c) acc[q][c] = a_.bias_down ? to_float(a_.bias_down[e * H + c]) : 0.0f;
        s[q] = a_.s_d + (p0 + q) * rd;
      }
      expand_rows(acc, s, n, a_.at_down + e * rd * H, rd, H, H);
    }
#else
    (void)it;
#endif
  }

  void run_block(int64_t b) const {
    const int64_t H = a_.hidden, c0 = b * kCols, w = std::min(kCols, H - c0);
    for (int64_t p = 0; p < a_.pairs; ++p) {
      const float wt = a_.pair_weight[p];
      const float* acc = d_.row(p, H) + c0;
      float* yt = a_.y + a_.pair_token[p] * H + c0;
      for (int64_t c = 0; c < w; ++c) yt[c] += wt * acc[c];
    }
  }

 private:
  OverlayDownArgsT<F> a_;
  std::vector<int64_t> active_;
  PairBuffer d_;
};

// A GateUpRows or DownRows shared by the threads of the enclosing parallel region (orphaned worksharing loops):
// its items, then its column blocks.
template <typename Rows>
void share_rows(const Rows& rows) {
  const int64_t items = rows.items(), blocks = rows.blocks();
  LZ_OMP(for schedule(dynamic))
  for (int64_t it = 0; it < items; ++it) rows.run_item(it);
  LZ_OMP(for schedule(dynamic))
  for (int64_t b = 0; b < blocks; ++b) rows.run_block(b);
}

}  // namespace

template <typename F>
void overlay_gate_up_cpu(const OverlayGateUpArgsT<F>& a) {
  std::memset(a.hw, 0, sizeof(float) * a.tokens * a.inter);
  if (rows_expand(a.pairs)) {
    const GateUpRows<F> rows(a);
    LZ_OMP(parallel)
    share_rows(rows);
    return;
  }
  const int64_t blocks = column_blocks(a.inter);
  LZ_OMP(parallel for schedule(static))
  for (int64_t b = 0; b < blocks; ++b) gate_up_block(a, b);
}

template <typename F>
void overlay_down_cpu(const OverlayDownArgsT<F>& a) {
  if (rows_expand(a.pairs)) {
    const DownRows<F> rows(a);
    LZ_OMP(parallel)
    share_rows(rows);
    return;
  }
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
                       int64_t ldy, int tokens) {
  stored_matvec_and_shrink_cpu(MatvecProblem{w, x, x_rows, n, y, ldy, tokens}, ShrinkProblem{});
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
      MatvecProblem{a.base_gate_up, a.x, nullptr, T, gu0.data(), 2 * I, a.token_mode},
      ShrinkProblem{a.b_gate_up, rgu, offsets.data(), E, P, a.x, pair_token.data(), s_gu.data()});
  MatvecShrinkPlan down_products(MatvecProblem{a.base_down, hw.data(), nullptr, T, a.y, H, a.token_mode},
                                 ShrinkProblem{a.b_down, rd, offsets.data(), E, P, h.data(), nullptr, s_d.data()});
  const OverlayGateUpArgsT<F> gate_up{gu0.data(), s_gu.data(), pair_token.data(), pair_weight.data(), offsets.data(),
                                      a.at_gate, a.at_up, a.bias_gate, a.bias_up, T, I, P, E, a.rank_gate, a.rank_up,
                                      a.activation, a.alpha, a.limit, h.data(), hw.data()};
  const OverlayDownArgsT<F> down{s_d.data(), pair_token.data(), pair_weight.data(), offsets.data(), a.at_down,
                                 a.bias_down, T, H, P, E, rd, a.y};
  gate_up_products.prepare_inputs();
  const int64_t n1 = gate_up_products.items(), n3 = down_products.items();
  const int64_t gate_up_blocks = column_blocks(I), down_blocks = column_blocks(H);
  const bool by_rows = rows_expand(P);
  const GateUpRows<F> gate_up_rows(by_rows ? gate_up : OverlayGateUpArgsT<F>{});
  const DownRows<F> down_rows(by_rows ? down : OverlayDownArgsT<F>{});
  // One parallel region for the whole forward: each stage is a worksharing loop whose implicit barrier hands
  // its output to the next (a region per stage waits for every thread to wake, a descheduled one included).
  LZ_OMP(parallel)
  {
    LZ_OMP(for schedule(dynamic))
    for (int64_t it = 0; it < n1; ++it) gate_up_products.run(it);
    if (by_rows) {
      share_rows(gate_up_rows);
    } else {
      LZ_OMP(for schedule(dynamic))
      for (int64_t b = 0; b < gate_up_blocks; ++b) gate_up_block(gate_up, b);
    }
    LZ_OMP(single)
    down_products.prepare_inputs();
    LZ_OMP(for schedule(dynamic))
    for (int64_t it = 0; it < n3; ++it) down_products.run(it);
    if (by_rows) {
      share_rows(down_rows);
    } else {
      LZ_OMP(for schedule(dynamic))
      for (int64_t b = 0; b < down_blocks; ++b) down_block(down, b);
    }
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
