// Why: the CPU fused expand + activation + weighted reduction of the overlay MoE forward. Pairs are
// grouped by expert so each expand row A[e]^T[j, cols] is loaded once per tile of 4 pairs; threads own
// column blocks, so the per-token sums need no atomics and are deterministic.
#include <algorithm>
#include <cstring>

#include "overlay_moe/overlay_moe.h"
#include "overlay_moe/overlay_moe_math.h"

namespace lazarus {
namespace {

constexpr int64_t kCols = 64;   // columns per block (fits 4 pairs x 2 accumulators x 64 floats in L1)
constexpr int64_t kTile = 4;    // pairs sharing one pass over an expert's expand rows

// acc[q][c] += sum_j s[q][j] * at[j][c0 + c]   for q < n pairs, c < w columns
inline void expand_tile(float (*acc)[kCols], const float* const* s, int64_t n, const float* at, int64_t rank,
                        int64_t ld, int64_t c0, int64_t w) {
  for (int64_t j = 0; j < rank; ++j) {
    const float* row = at + j * ld + c0;
    for (int64_t q = 0; q < n; ++q) {
      const float sj = s[q][j];
      float* out = acc[q];
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) out[c] += sj * row[c];
    }
  }
}

}  // namespace

void overlay_gate_up_cpu(const OverlayGateUpArgs& a) {
  const int64_t I = a.inter, rg = a.rank_gate, ru = a.rank_up, r = rg + ru;
  const int64_t blocks = (I + kCols - 1) / kCols;
  std::memset(a.hw, 0, sizeof(float) * a.tokens * I);
#if defined(LAZARUS_WITH_OPENMP)
#pragma omp parallel for schedule(static)
#endif
  for (int64_t b = 0; b < blocks; ++b) {
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
          for (int64_t c = 0; c < w; ++c) {
            g[q][c] = base[c] + (a.bias_gate ? a.bias_gate[e * I + c0 + c] : 0.0f);
            u[q][c] = base[I + c] + (a.bias_up ? a.bias_up[e * I + c0 + c] : 0.0f);
          }
          sg[q] = a.s_gu + (p0 + q) * r;
          su[q] = sg[q] + rg;
        }
        expand_tile(g, sg, n, a.at_gate + e * rg * I, rg, I, c0, w);
        expand_tile(u, su, n, a.at_up + e * ru * I, ru, I, c0, w);
        for (int64_t q = 0; q < n; ++q) {
          const int64_t p = p0 + q, t = a.pair_token[p];
          const float wt = a.pair_weight[p];
          float* hp = a.h + p * I + c0;
          float* hwt = a.hw + t * I + c0;
          for (int64_t c = 0; c < w; ++c) {
            const float v = overlay::activation(g[q][c], u[q][c], a.activation, a.alpha, a.limit);
            hp[c] = v;
            hwt[c] += wt * v;
          }
        }
      }
    }
  }
}

void overlay_down_cpu(const OverlayDownArgs& a) {
  const int64_t H = a.hidden, rd = a.rank_down;
  const int64_t blocks = (H + kCols - 1) / kCols;
#if defined(LAZARUS_WITH_OPENMP)
#pragma omp parallel for schedule(static)
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = b * kCols, w = std::min(kCols, H - c0);
    float acc[kTile][kCols];
    for (int64_t e = 0; e < a.experts; ++e) {
      for (int64_t p0 = a.offsets[e]; p0 < a.offsets[e + 1]; p0 += kTile) {
        const int64_t n = std::min(kTile, a.offsets[e + 1] - p0);
        const float* s[kTile];
        for (int64_t q = 0; q < n; ++q) {
          for (int64_t c = 0; c < w; ++c) acc[q][c] = a.bias_down ? a.bias_down[e * H + c0 + c] : 0.0f;
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
}

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
