// Why: the CPU overlay MoE kernels, reading every weight in its stored precision (fp32, bf16, fp16) and
// computing in fp32 registers. The fused expand + activation + weighted reduction groups pairs by expert so
// each expand row A[e]^T[j, cols] is loaded once per tile of 4 pairs; threads own column blocks, so the
// per-token sums need no atomics and are deterministic. A small batch (at most kRowExpandPairs pairs) runs the
// expand expert by expert instead, each factor matrix streamed over full rows, with the same bits. The base
// products and shrinks are stored_matvec_cpu.cpp's; the one-call forward of a small batch runs them here.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common/avx2_math.h"
#include "common/cpu_kernels.h"
#include "common/float_bits.h"
#include "common/shared_runs.h"
#include "common/stream_prefetch.h"
#include "overlay_moe/overlay_moe.h"
#include "overlay_moe/overlay_moe_math.h"
#include "overlay_moe/stored_matvec_cpu.h"

namespace lazarus {
namespace {

constexpr int64_t kCols = 256;        // columns per block: pair rows read as 1 KB runs; 4 pairs x 2 x 256 floats
constexpr int64_t kTile = 4;          // pairs sharing one pass over an expert's expand rows
constexpr int64_t kRowsAhead = 16;    // software prefetch distance of the expand kernel, in factor rows

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

// h[c] = act(g0[c] + g[c], u0[c] + u[c]); hw[c] += wt * h[c] for c < w, 8 at a time (scalar tail:
// activation_cpu): g0, u0 are the token's base products, g, u the pair's bias + expand.
// min/max return their SECOND operand when either is NaN: the limit goes first so a NaN passes through.
LZ_TARGET_AVX2 void activate_avx2(const float* g, const float* u, const float* g0, const float* u0, int64_t w,
                                  int kind, float alpha, float limit, float wt, float* h, float* hw) {
  const __m256 one = _mm256_set1_ps(1.0f), lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit);
  const __m256 scale = _mm256_set1_ps(kind == overlay::kGptOss ? -alpha : -1.0f), vw = _mm256_set1_ps(wt);
  int64_t c = 0;
  for (; c + 8 <= w; c += 8) {
    __m256 gv = _mm256_add_ps(_mm256_loadu_ps(g0 + c), _mm256_loadu_ps(g + c));
    __m256 uv = _mm256_add_ps(_mm256_loadu_ps(u0 + c), _mm256_loadu_ps(u + c));
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
    h[c] = activation_cpu(g0[c] + g[c], u0[c] + u[c], kind, alpha, limit);
    hw[c] += wt * h[c];
  }
}

// activate_avx2 16 columns per step (the last 1..15 by activate_avx2): per column the same operations in the same
// order, so the same bits. At T=1 the activation runs between the two stages, with nothing else to do: 12 us per
// thread in ymm on the Intel AVX-512 host (4 pairs x 2880 columns over 2 threads).
LZ_TARGET_AVX512_VNNI void activate_zmm(const float* g, const float* u, const float* g0, const float* u0, int64_t w,
                                        int kind, float alpha, float limit, float wt, float* h, float* hw) {
  const __m512 one = _mm512_set1_ps(1.0f), lim = _mm512_set1_ps(limit), nlim = _mm512_set1_ps(-limit);
  const __m512 scale = _mm512_set1_ps(kind == overlay::kGptOss ? -alpha : -1.0f), vw = _mm512_set1_ps(wt);
  int64_t c = 0;
  for (; c + 16 <= w; c += 16) {
    __m512 gv = _mm512_add_ps(_mm512_loadu_ps(g0 + c), _mm512_loadu_ps(g + c));
    __m512 uv = _mm512_add_ps(_mm512_loadu_ps(u0 + c), _mm512_loadu_ps(u + c));
    if (kind == overlay::kGptOss) {
      gv = _mm512_min_ps(lim, gv);
      uv = _mm512_add_ps(_mm512_min_ps(lim, _mm512_max_ps(nlim, uv)), one);
    }
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, simd::exp_zmm(_mm512_mul_ps(scale, gv))));
    const __m512 hv = _mm512_mul_ps(_mm512_mul_ps(gv, sig), uv);
    _mm512_storeu_ps(h + c, hv);
    _mm512_storeu_ps(hw + c, _mm512_fmadd_ps(vw, hv, _mm512_loadu_ps(hw + c)));
  }
  if (c < w) activate_avx2(g + c, u + c, g0 + c, u0 + c, w - c, kind, alpha, limit, wt, h + c, hw + c);
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
// full width (R streams of w values, while `ahead` sweeps the next pass's R rows, one contiguous region when
// ld == w, into L2), each row converted once per N pairs; the accumulators stay in L1. Per column the FMAs run
// in j order, as in expand_columns_avx2, so both give the same bits. Each column's R FMAs form one dependent
// chain: for one pair a step takes V = 4 column vectors, so 4 chains are in flight (more pairs bring chains of
// their own and share each converted row).
template <int N, int R, typename F>
LZ_TARGET_AVX2 void expand_rows_pass_avx2(float* const* acc, const float* const* s, const F* rows, int64_t ld,
                                          int64_t j, int64_t w, simd::SweepAhead& ahead) {
  constexpr int V = N == 1 ? 4 : 1;  // more pairs give the chains in flight (and share each converted row)
  int64_t c = 0;
  if constexpr (V > 1)
    for (; c + 8 * V <= w; c += 8 * V) {
      ahead.step(R * 8 * V * sizeof(F));
      for (int q = 0; q < N; ++q) {
        __m256 v[V];
        for (int u = 0; u < V; ++u) v[u] = _mm256_loadu_ps(acc[q] + c + 8 * u);
        for (int k = 0; k < R; ++k) {
          const __m256 sk = _mm256_broadcast_ss(s[q] + j + k);
          for (int u = 0; u < V; ++u) v[u] = _mm256_fmadd_ps(sk, simd::load8(rows + k * ld + c + 8 * u), v[u]);
        }
        for (int u = 0; u < V; ++u) _mm256_storeu_ps(acc[q] + c + 8 * u, v[u]);
      }
    }
  for (; c + 8 <= w; c += 8) {
    ahead.step(R * 8 * sizeof(F));
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

// expand_rows_pass_avx2 16 columns per step in zmm registers: per column the same FMAs in the same j order, so
// the same bits, with half the instructions per factor byte (the T=1 expand streams its factors from DRAM, and
// fewer instructions between the loads keep more of them in flight). The last 1..15 columns run the ymm pass.
template <int N, int R, typename F>
LZ_TARGET_AVX512_VNNI void expand_rows_pass_zmm(float* const* acc, const float* const* s, const F* rows, int64_t ld,
                                                int64_t j, int64_t w, simd::SweepAhead& ahead) {
  int64_t c = 0;
  for (; c + 16 <= w; c += 16) {
    ahead.step(R * 16 * sizeof(F));
    __m512 r[R];
    for (int k = 0; k < R; ++k) r[k] = simd::load16(rows + k * ld + c);
    for (int q = 0; q < N; ++q) {
      __m512 v = _mm512_loadu_ps(acc[q] + c);
      for (int k = 0; k < R; ++k) v = _mm512_fmadd_ps(_mm512_set1_ps(s[q][j + k]), r[k], v);
      _mm512_storeu_ps(acc[q] + c, v);
    }
  }
  if (c < w) {  // the last 1..15 columns: the ymm pass (its 8-column step and scalar tail)
    float* rest[N];
    for (int q = 0; q < N; ++q) rest[q] = acc[q] + c;
    expand_rows_pass_avx2<N, R>(rest, s, rows + c, ld, j, w - c, ahead);
  }
}

template <int N, int R, typename F>
void expand_rows_pass(bool zmm, float* const* acc, const float* const* s, const F* at, int64_t rank, int64_t ld,
                      int64_t j, int64_t w) {
  simd::SweepAhead ahead(at + (j + R) * ld, at + rank * ld);  // the next pass's rows (j + R <= rank)
  if (zmm) {
    expand_rows_pass_zmm<N, R>(acc, s, at + j * ld, ld, j, w, ahead);
  } else {
    expand_rows_pass_avx2<N, R>(acc, s, at + j * ld, ld, j, w, ahead);
  }
}

// The rank rows in passes of R (then single rows), each pass in the ymm or the zmm form (the same bits).
template <int N, typename F>
void expand_rows_passes(bool zmm, float* const* acc, const float* const* s, const F* at, int64_t rank, int64_t ld,
                        int64_t w) {
  constexpr int R = N == 1 ? 2 : 4;  // N accumulators + R rows + the broadcast in 16 ymm registers; with
  // the next pass swept into L2 (simd::SweepAhead), 2 rows per pass for one pair ran 0.5-1.8 % faster than 4 and
  // 1-2 % faster than 8 (the T=1 forward, cold, AMD Zen 4)
  int64_t j = 0;
  for (; j + R <= rank; j += R) expand_rows_pass<N, R>(zmm, acc, s, at, rank, ld, j, w);
  for (; j < rank; ++j) expand_rows_pass<N, 1>(zmm, acc, s, at, rank, ld, j, w);
}

// expand_rows_passes for n <= kTile pairs, in zmm where the AVX-512 forms run (cpu_avx512_vnni(False): ymm).
template <typename F>
void expand_rows(float* const* acc, const float* const* s, int64_t n, const F* at, int64_t rank, int64_t ld,
                 int64_t w) {
  const bool zmm = use_avx512_vnni();
  switch (n) {
    case 1: return expand_rows_passes<1>(zmm, acc, s, at, rank, ld, w);
    case 2: return expand_rows_passes<2>(zmm, acc, s, at, rank, ld, w);
    case 3: return expand_rows_passes<3>(zmm, acc, s, at, rank, ld, w);
    default: return expand_rows_passes<4>(zmm, acc, s, at, rank, ld, w);
  }
}
#endif

// activate_zmm or activate_avx2 where it runs (the same bits), else the same sums and activation one column at a time.
void activate(const float* g, const float* u, const float* g0, const float* u0, int64_t w, int kind, float alpha,
              float limit, float wt, float* h, float* hw) {
#if defined(LAZARUS_AVX2_MATH)
  if (use_avx512_vnni()) return activate_zmm(g, u, g0, u0, w, kind, alpha, limit, wt, h, hw);
  if (simd::cpu_has_avx2_fma_f16c()) return activate_avx2(g, u, g0, u0, w, kind, alpha, limit, wt, h, hw);
#endif
  for (int64_t c = 0; c < w; ++c) {
    h[c] = activation_cpu(g0[c] + g[c], u0[c] + u[c], kind, alpha, limit);
    hw[c] += wt * h[c];
  }
}

// acc[c] = bias[c] (0 without a bias) for c < w.
template <typename F>
void init_bias(float* acc, const F* bias, int64_t w) {
  for (int64_t c = 0; c < w; ++c) acc[c] = bias ? to_float(bias[c]) : 0.0f;
}

// Column block b (kCols columns of I) of overlay_gate_up: every pair's bias + expand there, then its activation
// of the token's base products plus those (the base is added last, so that the row-streamed expand, which runs
// alongside the base products in the one-call forward, gives the same bits).
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
        init_bias(g[q], a.bias_gate ? a.bias_gate + e * I + c0 : nullptr, w);
        init_bias(u[q], a.bias_up ? a.bias_up + e * I + c0 : nullptr, w);
        sg[q] = a.s_gu + (p0 + q) * r;
        su[q] = sg[q] + rg;
      }
      expand_tile(g, sg, n, a.at_gate + e * rg * I, rg, I, c0, w);
      expand_tile(u, su, n, a.at_up + e * ru * I, ru, I, c0, w);
      for (int64_t q = 0; q < n; ++q) {
        const int64_t p = p0 + q, t = a.pair_token[p];
        const float* base = a.gu0 + t * 2 * I + c0;
        activate(g[q], u[q], base, base + I, w, a.activation, a.alpha, a.limit, a.pair_weight[p], a.h + p * I + c0,
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
        init_bias(acc[q], a.bias_down ? a.bias_down + e * H + c0 : nullptr, w);
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

// Bytes each thread asks for in L2 of what it reads first in the down stage, as it ends the gate/up stage: the
// memory would otherwise idle through the barrier and the activation (about 20 us at T=1). Measured on an Intel
// AVX-512 host (the T=1 forward at the gpt-oss-20b layer, in-process A/B, flushed after a 256 MB read): 64 KB
// 1.0-1.5 % faster than none in three runs, 32 and 128 KB about half that; asking for the gate/up stage's first
// bytes the same way on the serial start gained nothing, and so did asking for the next item's first 16-64 KB
// wherever an item starts a stream of its own (a new expert's shrink, an expand).
constexpr int64_t kStageEdgeBytes = 64 << 10;

bool rows_expand(int64_t pairs) { return pairs <= kRowExpandPairs && use_avx2(); }

// The experts that have pairs, in order.
std::vector<int64_t> active_experts(const int64_t* offsets, int64_t experts) {
  std::vector<int64_t> active;
  active.reserve(static_cast<size_t>(experts));
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
  int64_t item_expert(int64_t it) const { return active_[it / 2]; }
  // The first `bytes` of the factor rows item `it` streams, asked for in L2.
  void prefetch_item(int64_t it, int64_t bytes) const {
#if defined(LAZARUS_AVX2_MATH)
    const int64_t e = active_[it / 2], I = a_.inter, rank = it % 2 == 1 ? a_.rank_up : a_.rank_gate;
    const F* at = it % 2 == 1 ? a_.at_up + e * a_.rank_up * I : a_.at_gate + e * a_.rank_gate * I;
    simd::prefetch_l2(at, std::min<int64_t>(bytes, rank * I * static_cast<int64_t>(sizeof(F))));
#else
    (void)it, (void)bytes;
#endif
  }

  // Each pair of the item's expert: its bias (gate or up half) + A^T s, full width (it does not read the base
  // products: run_block adds them).
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
        init_bias(acc[q], bias ? bias + e * I : nullptr, I);
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
    for (int64_t p = 0; p < a_.pairs; ++p) {
      const float* base = a_.gu0 + a_.pair_token[p] * 2 * I + c0;
      activate(g_.row(p, I) + c0, u_.row(p, I) + c0, base, base + I, w, a_.activation, a_.alpha, a_.limit,
               a_.pair_weight[p], a_.h + p * I + c0, a_.hw + a_.pair_token[p] * I + c0);
    }
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
  int64_t item_expert(int64_t it) const { return active_[it]; }
  void prefetch_item(int64_t it, int64_t bytes) const {
#if defined(LAZARUS_AVX2_MATH)
    const int64_t H = a_.hidden, rd = a_.rank_down;
    simd::prefetch_l2(a_.at_down + active_[it] * rd * H, std::min<int64_t>(bytes, rd * H * static_cast<int64_t>(sizeof(F))));
#else
    (void)it, (void)bytes;
#endif
  }

  void run_item(int64_t it) const {
#if defined(LAZARUS_AVX2_MATH)
    const int64_t e = active_[it], H = a_.hidden, rd = a_.rank_down;
    for (int64_t p0 = a_.offsets[e]; p0 < a_.offsets[e + 1]; p0 += kTile) {
      const int64_t n = std::min(kTile, a_.offsets[e + 1] - p0);
      float* acc[kTile];
      const float* s[kTile];
      for (int64_t q = 0; q < n; ++q) {
        acc[q] = d_.row(p0 + q, H);
        init_bias(acc[q], a_.bias_down ? a_.bias_down + e * H : nullptr, H);
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

// A stage of the one-call forward as ONE pool of items shared as SharedRuns: the shrinks, the row-streamed expands
// (GateUpRows or DownRows items), each of which first waits until every shrink item of its expert is done, and
// the base's row runs. The expands' factors then stream while the other threads stream the base, instead of
// after a barrier with every thread on the expands alone (at T=1 they ran there at 23-31 GB/s against 40 for the
// products). Where the shrinks and expands together fit in run 0 (T=1), the expands come before the base, so that
// the runs meet, and the threads end, in the base's small items (64 rows, 92 KB of MXFP4) rather than in an expand
// (a whole factor matrix, 368 KB at the gpt-oss-20b shape): with the expands last, the thread that took the last
// one ended the down stage 14-16 us after the other (median, Intel AVX-512 host, T=1), and 1-3 us with the base
// last. Where they do not fit (T=4 there: 120 shrink items of 240), the base comes before the expands: the other
// threads' runs would otherwise start with expands waiting on run 0's shrinks (the T=4 forward 8 % slower).
// Deadlock-free because every shrink lies in run 0: the team's thread 0 runs run 0 front to back, so
// it meets an expand only once every shrink has been taken, and a shrink never waits (usable() says whether the
// items fit so; where they do not, the forward runs its stages one after another). run(prepare) also takes the
// rounding of the base's input rows off the serial start: the team's last thread runs `prepare` first and the
// base items wait for it, while the other threads already stream (thread 0 starts with the shrinks, which read
// the fp32 rows); it never waits before it is done, so nothing waits on a thread that waits.
template <typename Rows>
class ProductsAndExpands {
 public:
  ProductsAndExpands(const MatvecShrinkPlan& plan, const Rows& rows, int64_t experts, int runs)
      : plan_(plan),
        rows_(rows),
        base_(plan.base_items()),
        shrinks_(plan.items() - base_),
        expands_(rows.items()),
        need_(static_cast<size_t>(experts), 0),
        done_(new std::atomic<int64_t>[static_cast<size_t>(std::max<int64_t>(1, experts))]),
        runs_(shrinks_ + base_ + expands_, runs),
        usable_(shrinks_ <= (shrinks_ + base_ + expands_) / std::max(1, runs)),
        expands_first_(shrinks_ + expands_ <= (shrinks_ + base_ + expands_) / std::max(1, runs)) {
    for (int64_t it = base_; it < plan.items(); ++it) ++need_[static_cast<size_t>(plan.shrink_expert(it))];
    for (int64_t e = 0; e < experts; ++e) done_[e].store(0, std::memory_order_relaxed);
  }

  bool usable() const { return usable_; }

  // Every thread of the team once, inside the parallel region (no barrier at the end).
  template <typename Prepare>
  void run(Prepare prepare) {
#if defined(LAZARUS_WITH_OPENMP)
    const bool preparer = omp_get_thread_num() == omp_get_num_threads() - 1;
#else
    const bool preparer = true;
#endif
    if (preparer) {
      prepare();
      prepared_.store(true, std::memory_order_release);
    }
    runs_.for_each([&](int64_t i) {
      const Slot at = slot(i);
      if (at.kind == kShrink) {
        plan_.run(base_ + at.k);
        done_[plan_.shrink_expert(base_ + at.k)].fetch_add(1, std::memory_order_release);
      } else if (at.kind == kBase) {
        while (!prepared_.load(std::memory_order_acquire)) spin_pause();
        plan_.run(at.k);
      } else {
        const int64_t e = rows_.item_expert(at.k);
        while (done_[e].load(std::memory_order_acquire) < need_[static_cast<size_t>(e)]) spin_pause();
        rows_.run_item(at.k);
      }
    });
  }

  // Whether `prepare` has run (what it built is then visible to the caller).
  bool prepared() const { return prepared_.load(std::memory_order_acquire); }

  // The first `bytes` of what the calling thread's run reads first, asked for in L2 before run() (see
  // kStageEdgeBytes).
  void prefetch_front(int64_t bytes) const {
    const int64_t i = runs_.front(thread());
    if (i >= 0) prefetch_item(i, bytes);
  }

 private:
  static int thread() {
#if defined(LAZARUS_WITH_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
  }

  // The first `bytes` of the weight rows item i reads, asked for in L2.
  void prefetch_item(int64_t i, int64_t bytes) const {
    const Slot at = slot(i);
    if (at.kind == kShrink) {
      plan_.prefetch(base_ + at.k, bytes);
    } else if (at.kind == kBase) {
      plan_.prefetch(at.k, bytes);
    } else {
      rows_.prefetch_item(at.k, bytes);
    }
  }

  // Pool item i as (kind, index among its kind): the shrinks first, then the expands and the base where every
  // expand still lies in run 0 (expands_first_), else the base and the expands.
  static constexpr int kShrink = 0, kBase = 1, kExpand = 2;
  struct Slot {
    int kind;
    int64_t k;
  };
  Slot slot(int64_t i) const {
    if (i < shrinks_) return {kShrink, i};
    i -= shrinks_;
    if (expands_first_) return i < expands_ ? Slot{kExpand, i} : Slot{kBase, i - expands_};
    return i < base_ ? Slot{kBase, i} : Slot{kExpand, i - base_};
  }

  static void spin_pause() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    _mm_pause();
#endif
  }

  const MatvecShrinkPlan& plan_;
  const Rows& rows_;
  int64_t base_, shrinks_, expands_;
  std::vector<int64_t> need_;
  std::unique_ptr<std::atomic<int64_t>[]> done_;
  SharedRuns runs_;
  bool usable_, expands_first_;
  std::atomic<bool> prepared_{false};
};

// The down stage of the one-call forward: its base + shrink plan (inputs laid out), expand rows and pool. Built on
// the first stage's preparing thread inside the region where that stage is pooled (its allocations then cost no
// serial time), before the region otherwise.
template <typename F>
struct DownStage {
  MatvecShrinkPlan products;
  DownRows<F> rows;
  SharedRuns runs;
  ProductsAndExpands<DownRows<F>> pool;
  bool pooled;  // run as one pool (else the products, then the expands)

  DownStage(const MatvecProblem& base, const ShrinkProblem& shrink, const OverlayDownArgsT<F>& args, bool by_rows,
            int64_t experts, int team)
      : products(base, shrink),
        rows(by_rows ? args : OverlayDownArgsT<F>{}),
        runs(products.items(), team),
        pool(products, rows, experts, team),
        pooled(by_rows && pool.usable()) {
    products.layout_inputs();  // its base input hw is rounded block by block as the activation finishes it
  }
};

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
  // Every element of these is written before it is read, except hw (the activation stage accumulates into it):
  // left uninitialised, as zero-filling them cost microseconds of cold stores at T=1.
  const PairBuffer gu0(T, 2 * I), s_gu(P, rgu), h(P, I), s_d(P, rd);
  std::vector<float> hw(static_cast<size_t>(T * I));
  MatvecShrinkPlan gate_up_products(
      MatvecProblem{a.base_gate_up, a.x, nullptr, T, gu0.data.get(), 2 * I, a.token_mode},
      ShrinkProblem{a.b_gate_up, rgu, offsets.data(), E, P, a.x, pair_token.data(), s_gu.data.get()});
  const OverlayGateUpArgsT<F> gate_up{gu0.data.get(), s_gu.data.get(), pair_token.data(), pair_weight.data(),
                                      offsets.data(), a.at_gate, a.at_up, a.bias_gate, a.bias_up, T, I, P, E,
                                      a.rank_gate, a.rank_up, a.activation, a.alpha, a.limit, h.data.get(),
                                      hw.data()};
  const OverlayDownArgsT<F> down{s_d.data.get(), pair_token.data(), pair_weight.data(), offsets.data(), a.at_down,
                                 a.bias_down, T, H, P, E, rd, a.y};
  const int64_t n1 = gate_up_products.items();
  const int64_t gate_up_blocks = column_blocks(I), down_blocks = column_blocks(H);
  const bool by_rows = rows_expand(P);
  const GateUpRows<F> gate_up_rows(by_rows ? gate_up : OverlayGateUpArgsT<F>{});
  const int team = SharedRuns::team_size();
  // The base inputs: x rounded for the gate/up products (laid out here: the shrinks read the fp32 rows the layout
  // points to), then the down stage built; inside the region where the first stage is pooled.
  gate_up_products.layout_inputs();
  std::optional<DownStage<F>> down_stage;
  const auto prepare_inputs = [&] {
    gate_up_products.commit_inputs(gate_up_products.fill_base_inputs(0, H));
    down_stage.emplace(MatvecProblem{a.base_down, hw.data(), nullptr, T, a.y, H, a.token_mode},
                       ShrinkProblem{a.b_down, rd, offsets.data(), E, P, h.data.get(), nullptr, s_d.data.get()},
                       down, by_rows, E, team);
  };
  // One parallel region for the whole forward: each stage is a worksharing loop whose barrier hands its output
  // to the next (a region per stage waits for every thread to wake, a descheduled one included).
  // The products' items are runs of consecutive base rows (then the shrinks'), shared as SharedRuns: each thread
  // streams one contiguous run, then takes the others' last items. The guided schedule this replaces also kept
  // the streams contiguous but gave the first thread half the items in one chunk: the two threads then ended the
  // gate/up products 40 us apart (median; 120 us at p75) and the down products 18-66 us apart, one core streaming
  // alone meanwhile (now 4-5 us apart; the T=1 forward 1.5-6 % faster in four interleaved A/B runs).
  // Each column block of the activation also rounds those columns of hw for the down product (they are final
  // once the block has run every pair), instead of one thread rounding all of hw while the others wait.
  bool finite = true;  // every block of hw finite: the rounded rows are usable
  const auto fill_hw = [&](int64_t b) {
    return down_stage->products.fill_base_inputs(b * kCols, std::min(I, (b + 1) * kCols));
  };
  // With the expands row-streamed, each expand runs in its products' pool (ProductsAndExpands) where the items
  // allow it, else after them.
  SharedRuns gate_up_runs(n1, team);
  ProductsAndExpands<GateUpRows<F>> gate_up_pool(gate_up_products, gate_up_rows, E, team);
  const bool pooled_gate_up = by_rows && gate_up_pool.usable();
  if (!pooled_gate_up) prepare_inputs();
  LZ_OMP(parallel)
  {
    if (pooled_gate_up) {
      gate_up_pool.run(prepare_inputs);
    } else {
      gate_up_runs.for_each([&](int64_t it) { gate_up_products.run(it); });
    }
    // The down stage's first bytes on their way while this thread waits at the barrier and runs the activation.
    if ((!pooled_gate_up || gate_up_pool.prepared()) && down_stage->pooled) down_stage->pool.prefetch_front(kStageEdgeBytes);
    LZ_OMP(barrier)
    if (by_rows) {
      if (!pooled_gate_up) {
        const int64_t items = gate_up_rows.items();
        LZ_OMP(for schedule(dynamic))
        for (int64_t it = 0; it < items; ++it) gate_up_rows.run_item(it);
      }
      LZ_OMP(for schedule(dynamic) reduction(&& : finite))
      for (int64_t b = 0; b < gate_up_blocks; ++b) {
        gate_up_rows.run_block(b);
        finite = fill_hw(b) && finite;
      }
    } else {
      LZ_OMP(for schedule(dynamic) reduction(&& : finite))
      for (int64_t b = 0; b < gate_up_blocks; ++b) {
        gate_up_block(gate_up, b);
        finite = fill_hw(b) && finite;
      }
    }
    DownStage<F>& ds = *down_stage;  // built before the first barrier
    LZ_OMP(single)
    ds.products.commit_inputs(finite);
    if (ds.pooled) {
      ds.pool.run([] {});
    } else {
      ds.runs.for_each([&](int64_t it) { ds.products.run(it); });
    }
    LZ_OMP(barrier)
    if (by_rows) {
      if (ds.pooled) {
        const int64_t blocks = ds.rows.blocks();
        LZ_OMP(for schedule(dynamic))
        for (int64_t b = 0; b < blocks; ++b) ds.rows.run_block(b);
      } else {
        share_rows(ds.rows);
      }
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
