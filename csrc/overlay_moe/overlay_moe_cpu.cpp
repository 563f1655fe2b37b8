// Why: the CPU fused expand + activation + weighted reduction of the overlay MoE forward. Pairs are
// grouped by expert so each expand row A[e]^T[j, cols] is loaded once per tile of 4 pairs; threads own
// column blocks, so the per-token sums need no atomics and are deterministic.
#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "overlay_moe/overlay_moe.h"
#include "overlay_moe/overlay_moe_math.h"

namespace lazarus {
namespace {

constexpr int64_t kCols = 256;  // columns per block: pair rows read as 1 KB runs; 4 pairs x 2 x 256 floats of accumulators
constexpr int64_t kTile = 4;    // pairs sharing one pass over an expert's expand rows

// acc[q][c] += sum_j s[q][j] * at[j][c0 + c]   for q < n pairs, c < w columns (portable loop)
inline void expand_tile_portable(float (*acc)[kCols], const float* const* s, int64_t n, const float* at, int64_t rank,
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

#if defined(__x86_64__) || defined(_M_X64)
// Register-blocked AVX2/FMA micro-kernel: N pairs x 16 columns stay in 2N ymm accumulators for the whole
// rank loop, so each expand row is loaded once per N pairs and no accumulator goes through memory.
template <int N>
__attribute__((target("avx2,fma"))) void expand_tile_avx2(float (*acc)[kCols], const float* const* s, const float* at,
                                                          int64_t rank, int64_t ld, int64_t c0, int64_t w) {
  int64_t c = 0;
  for (; c + 16 <= w; c += 16) {
    __m256 v[N][2];
    for (int q = 0; q < N; ++q) {
      v[q][0] = _mm256_loadu_ps(acc[q] + c);
      v[q][1] = _mm256_loadu_ps(acc[q] + c + 8);
    }
    const float* col = at + c0 + c;
    for (int64_t j = 0; j < rank; ++j) {
      const __m256 r0 = _mm256_loadu_ps(col + j * ld);
      const __m256 r1 = _mm256_loadu_ps(col + j * ld + 8);
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
      for (int64_t j = 0; j < rank; ++j) acc[q][c] += s[q][j] * at[j * ld + c0 + c];
}

// exp(x) for 8 floats (Cephes expf polynomial, relative error ~2e-7; x clamped to [-88, 88]).
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// h[c] = act(g[c], u[c]); hw[c] += wt * h[c] for c < w, 8 at a time (scalar tail: the shared arithmetic).
__attribute__((target("avx2,fma"))) void activate_avx2(const float* g, const float* u, int64_t w, int kind, float alpha,
                                                       float limit, float wt, float* h, float* hw) {
  const __m256 one = _mm256_set1_ps(1.0f), lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit);
  const __m256 scale = _mm256_set1_ps(kind == overlay::kGptOss ? -alpha : -1.0f), vw = _mm256_set1_ps(wt);
  int64_t c = 0;
  for (; c + 8 <= w; c += 8) {
    __m256 gv = _mm256_loadu_ps(g + c), uv = _mm256_loadu_ps(u + c);
    if (kind == overlay::kGptOss) {
      gv = _mm256_min_ps(gv, lim);
      uv = _mm256_add_ps(_mm256_min_ps(_mm256_max_ps(uv, nlim), lim), one);
    }
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_mul_ps(scale, gv))));
    const __m256 hv = _mm256_mul_ps(_mm256_mul_ps(gv, sig), uv);
    _mm256_storeu_ps(h + c, hv);
    _mm256_storeu_ps(hw + c, _mm256_fmadd_ps(vw, hv, _mm256_loadu_ps(hw + c)));
  }
  for (; c < w; ++c) {
    h[c] = overlay::activation(g[c], u[c], kind, alpha, limit);
    hw[c] += wt * h[c];
  }
}

bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

inline void expand_tile(float (*acc)[kCols], const float* const* s, int64_t n, const float* at, int64_t rank,
                        int64_t ld, int64_t c0, int64_t w) {
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_has_avx2_fma()) {
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
          std::memcpy(g[q], base, sizeof(float) * w);
          std::memcpy(u[q], base + I, sizeof(float) * w);
          if (a.bias_gate) {
            const float* bg = a.bias_gate + e * I + c0;
            for (int64_t c = 0; c < w; ++c) g[q][c] += bg[c];
          }
          if (a.bias_up) {
            const float* bu = a.bias_up + e * I + c0;
            for (int64_t c = 0; c < w; ++c) u[q][c] += bu[c];
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
#if defined(__x86_64__) || defined(_M_X64)
          if (cpu_has_avx2_fma()) {
            activate_avx2(g[q], u[q], w, a.activation, a.alpha, a.limit, wt, hp, hwt);
            continue;
          }
#endif
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
