// Why: y = x @ W^T for an MXFP4 W and many token rows (the base products of batches above the matrix-vector
// kernel's GEMV_MAX_ROWS) in integers, with AVX-512 VNNI or, in the same layout and with the same bits, AVX2. Each
// token row is rounded per 32-element block exactly as the matrix-vector kernel rounds it (q8_blocks.h), each
// weight row is decoded once per call to 2 * E2M1 + 12 as uint8, and vpdpbusd sums 64 u8 x s8 products per
// instruction (an fp32 FMA does 16 multiply-adds): 16 dpbusd per 32-element block and 16-row vector in kFixed16
// (2 terms), 8 in kInt8 (AVX2: vpmaddubsw + vpmaddwd, panel_tile_avx2). The integer sums are exact; one fp32 FMA
// per (token, row, block) applies the weight scale x token half scale, so the result differs from the
// matrix-vector kernel's only in the order of the fp32 sum over blocks.
//
// Layout: weights in panels of 32 rows (two zmm of 16 int32 lanes, or four ymm of 8, one row per lane), decoded
// by the thread that owns the panel into a buffer that stays in its L2 (codes[(8 b + j) * 128 + 64 v + 4 lane + q]
// = code of row 16 v + lane, element 32 b + element_at(4 j + q)), then met by every token row in register tiles
// of 4 tokens x 32 rows: the token's 4 bytes of the same elements are broadcast to all lanes. Rows with a scale
// byte 0 or 0xFF (NaN) are computed again by the fp32 kernel on unrounded tokens, and a token row holding inf or
// NaN makes the call decline (returns false), both as the matrix-vector kernel does, so NaN propagates.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/avx2_math.h"
#include "common/cpu_kernels.h"
#include "overlay_moe/overlay_moe.h"
#include "overlay_moe/q8_blocks.h"

namespace lazarus {
namespace {

constexpr int kLanes = 16;                              // weight rows per zmm: one int32 lane each
constexpr int kRowVecs = 2;                             // zmm of weight rows per panel
constexpr int kPanelRows = kLanes * kRowVecs;           // 32
constexpr int64_t kGroupBytes = kPanelRows * 4;         // codes of 4 elements of every panel row: 128 bytes
constexpr int kTileTokens = 4;                          // token rows per register tile
// Token rows per pass over the panels: their packed bytes (5.6 KB per 2880-column row in kFixed16) stay in the
// L2 while every panel meets them, and the pack's memory stays bounded; each pass decodes the panels again
// (about 1 ms at [5760, 2880]).
constexpr int64_t kTokenChunk = 256;

// Token rows as the GEMM reads them: per row, its block integers' bytes in element order (N = 256 hi + lo in
// kFixed16; q in hi in kInt8), per block its half scale and kCodeOffset times the sum of its integers.
struct TokenPack {
  int64_t cols = 0, groups = 0;
  std::vector<int8_t> hi, lo;
  std::vector<float> half_scale;
  std::vector<int32_t> corr;
};

// Element order of a block in the GEMM (the matrix-vector kernel's too, permute_for_mxfp4): within each 8
// elements the even ones, then the odd ones, so that 4 nibble bytes of a weight row (elements 8m .. 8m+7) give
// the codes of group 2m in their low nibbles and of group 2m+1 in their high ones.
constexpr int element_at(int i) { return (i & ~7) + 2 * (i & 3) + ((i >> 2) & 1); }

// True when none of the n values is inf or NaN (an exponent field of all ones).
bool all_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  LZ_OMP(parallel for schedule(static) reduction(| : bad))
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    bad |= static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
  }
  return bad == 0;
}

// The n token rows (all finite) rounded and laid out for the tiles, into tp's reused buffers.
void pack_tokens(const float* x, int64_t n, int64_t cols, int mode, TokenPack& tp) {
  const int64_t groups = cols / 32;
  tp.cols = cols;
  tp.groups = groups;
  tp.hi.resize(static_cast<size_t>(n * cols));
  tp.lo.resize(mode == kTokensFixed16 ? static_cast<size_t>(n * cols) : 0);
  tp.half_scale.resize(static_cast<size_t>(n * groups));
  tp.corr.resize(static_cast<size_t>(n * groups));
  LZ_OMP(parallel for schedule(static))
  for (int64_t t = 0; t < n; ++t) {
    int32_t v[32];
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = t * cols + 32 * g;
      q8::quantize_block_fast(x + at, mode, v, &tp.half_scale[t * groups + g]);  // finite: always true
      int32_t sum = 0;
      for (int i = 0; i < 32; ++i) {
        const int32_t e = v[element_at(i)];
        if (mode == kTokensFixed16) {
          const int32_t hi = (e + 128) >> 8;  // floor((N + 128) / 256): lo = N - 256 hi in [-128, 127]
          tp.hi[at + i] = static_cast<int8_t>(hi);
          tp.lo[at + i] = static_cast<int8_t>(e - 256 * hi);
        } else {
          tp.hi[at + i] = static_cast<int8_t>(e);
        }
        sum += e;
      }
      tp.corr[t * groups + g] = q8::kCodeOffset * sum;
    }
  }
}

// The panel's weight scales: wscale[32 b + i] = 2^(s-127) of row row0 + i as fp32 bits (s << 23: 0 for s = 0, inf
// for 0xFF), 0 past `rows`; special[r] is set for a row with a scale byte 0 or 0xFF.
void pack_scales(const uint8_t* scales, int64_t groups, int64_t row0, int64_t rows, float* wscale, uint8_t* special) {
  for (int i = 0; i < kPanelRows; ++i) {
    const int64_t r = row0 + i;
    float* sc = wscale + i;
    if (r >= rows) {
      for (int64_t b = 0; b < groups; ++b) sc[b * kPanelRows] = 0.0f;
      continue;
    }
    const uint8_t* s = scales + r * groups;
    bool odd = false;
    for (int64_t b = 0; b < groups; ++b) {
      const uint32_t bits = static_cast<uint32_t>(s[b]) << 23;
      std::memcpy(sc + b * kPanelRows, &bits, 4);
      odd |= s[b] == 0 || s[b] == 0xFF;
    }
    special[r] = odd;
  }
}

#if defined(LAZARUS_AVX2_MATH)
// Rows row0 .. row0+31 of the weight decoded into the panel layout: for block b and each 16-row vector v, the
// 16 rows' nibble bytes are loaded 4 rows per register (rows k, k+4, k+8, k+12 in register k, so that a 4 x 4
// transpose of 32-bit words leaves word m of every row in register m, in row order), and a byte shuffle maps
// each nibble to its code: low nibbles give group 2m, high nibbles group 2m+1. Rows past `rows` read a block of
// code 0 (+0, code 12) with scale 0. wscale[32 b + 16 v + lane] = 2^(s-127) as fp32 bits (s << 23: 0 for s = 0,
// inf for 0xFF); special[r] is set for a row with a scale byte 0 or 0xFF.
LZ_TARGET_AVX512_VNNI void pack_panel(const uint8_t* blocks, const uint8_t* scales, int64_t groups, int64_t row0,
                                      int64_t rows, uint8_t* codes, float* wscale, uint8_t* special) {
  alignas(16) static const uint8_t kZeroBlock[16] = {};
  const __m512i table =
      _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int v = 0; v < kRowVecs; ++v) {
    const uint8_t* src[kLanes];
    int64_t step[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const int64_t r = row0 + kLanes * v + l;
      src[l] = r < rows ? blocks + r * groups * 16 : kZeroBlock;
      step[l] = r < rows ? 16 : 0;
    }
    for (int64_t b = 0; b < groups; ++b) {
      __m512i z[4];
      for (int k = 0; k < 4; ++k) {
        const auto row = [&](int l) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[l] + step[l] * b)); };
        z[k] = _mm512_castsi128_si512(row(k));
        z[k] = _mm512_inserti32x4(z[k], row(k + 4), 1);
        z[k] = _mm512_inserti32x4(z[k], row(k + 8), 2);
        z[k] = _mm512_inserti32x4(z[k], row(k + 12), 3);
      }
      const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
      const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
      const __m512i d[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                            _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
      uint8_t* at = codes + 8 * b * kGroupBytes + 64 * v;
      for (int m = 0; m < 4; ++m) {
        const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(d[m], nibble));
        const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(d[m], 4), nibble));
        _mm512_storeu_si512(at + 2 * m * kGroupBytes, lo);
        _mm512_storeu_si512(at + (2 * m + 1) * kGroupBytes, hi);
      }
    }
  }
  pack_scales(scales, groups, row0, rows, wscale, special);
}

// y[t0 + c, row0 + 16 v + lane] for c < C. Per block, two independent sets of int32 sums (kFixed16: the hi and
// the lo term; kInt8: the even and the odd groups), so each dependency chain is 8 (4) dpbusd long instead of 16
// (8), the second set starting at minus the code offset's sum; then hi * 256 + lo (or even + odd), converted and
// scaled into fp32.
template <int C, int Mode>
LZ_TARGET_AVX512_VNNI void panel_tile(const uint8_t* codes, const float* wscale, const TokenPack& tp, int64_t t0,
                                      float* y, int64_t ldy, int64_t row0, int64_t rows) {
  constexpr bool kFixed16 = Mode == kTokensFixed16;
  const int64_t groups = tp.groups, cols = tp.cols;
  const int8_t* hi[C];
  const int8_t* lo[C];
  for (int c = 0; c < C; ++c) {
    hi[c] = tp.hi.data() + (t0 + c) * cols;
    lo[c] = kFixed16 ? tp.lo.data() + (t0 + c) * cols : hi[c];
  }
  const auto bcast = [](const int8_t* p) LZ_TARGET_AVX512_VNNI {
    int32_t four;
    std::memcpy(&four, p, 4);
    return _mm512_set1_epi32(four);
  };
  __m512 f[kRowVecs][C];
  for (int c = 0; c < C; ++c) f[0][c] = f[1][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < groups; ++b) {
    const uint8_t* cb = codes + 8 * b * kGroupBytes;
    __m512i p[kRowVecs][C], q[kRowVecs][C];
    for (int c = 0; c < C; ++c) {  // the second set starts at minus the code offset's sum
      p[0][c] = p[1][c] = _mm512_setzero_si512();
      q[0][c] = q[1][c] = _mm512_set1_epi32(-tp.corr[(t0 + c) * groups + b]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; j += kFixed16 ? 1 : 2) {
      const __m512i w0 = _mm512_loadu_si512(cb + j * kGroupBytes), w1 = _mm512_loadu_si512(cb + j * kGroupBytes + 64);
      const int jq = kFixed16 ? j : j + 1;  // the group the second set meets (its own codes in kInt8)
      const __m512i u0 = kFixed16 ? w0 : _mm512_loadu_si512(cb + jq * kGroupBytes);
      const __m512i u1 = kFixed16 ? w1 : _mm512_loadu_si512(cb + jq * kGroupBytes + 64);
      for (int c = 0; c < C; ++c) {
        const __m512i xp = bcast(hi[c] + 32 * b + 4 * j), xq = bcast(lo[c] + 32 * b + 4 * jq);
        p[0][c] = _mm512_dpbusd_epi32(p[0][c], w0, xp);
        p[1][c] = _mm512_dpbusd_epi32(p[1][c], w1, xp);
        q[0][c] = _mm512_dpbusd_epi32(q[0][c], u0, xq);
        q[1][c] = _mm512_dpbusd_epi32(q[1][c], u1, xq);
      }
    }
    const __m512 ws0 = _mm512_loadu_ps(wscale + b * kPanelRows), ws1 = _mm512_loadu_ps(wscale + b * kPanelRows + 16);
    for (int c = 0; c < C; ++c) {
      const __m512 hs = _mm512_set1_ps(tp.half_scale[(t0 + c) * groups + b]);
      for (int v = 0; v < kRowVecs; ++v) {
        const __m512i sum = kFixed16 ? _mm512_add_epi32(_mm512_slli_epi32(p[v][c], 8), q[v][c])
                                     : _mm512_add_epi32(p[v][c], q[v][c]);
        f[v][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(v ? ws1 : ws0, hs), f[v][c]);
      }
    }
  }
  for (int v = 0; v < kRowVecs; ++v) {
    const int64_t r = row0 + kLanes * v;
    if (r >= rows) break;
    const int64_t valid = std::min<int64_t>(kLanes, rows - r);
    const __mmask16 m = static_cast<__mmask16>(valid == kLanes ? 0xFFFF : (1u << valid) - 1);
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(y + (t0 + c) * ldy + r, m, f[v][c]);
  }
}

// pack_panel with AVX2: the same layout, 8 rows per ymm (rows k and k+4 of each 8 in register k's two lanes, so the
// same 4 x 4 word transpose leaves word m of the 8 rows in register m, in row order).
LZ_TARGET_AVX2 void pack_panel_avx2(const uint8_t* blocks, const uint8_t* scales, int64_t groups, int64_t row0,
                                    int64_t rows, uint8_t* codes, float* wscale, uint8_t* special) {
  alignas(16) static const uint8_t kZeroBlock[16] = {};
  const __m256i table = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                         12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int u = 0; u < kPanelRows / 8; ++u) {
    const uint8_t* src[8];
    int64_t step[8];
    for (int l = 0; l < 8; ++l) {
      const int64_t r = row0 + 8 * u + l;
      src[l] = r < rows ? blocks + r * groups * 16 : kZeroBlock;
      step[l] = r < rows ? 16 : 0;
    }
    for (int64_t b = 0; b < groups; ++b) {
      const auto row = [&](int l) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[l] + step[l] * b)); };
      __m256i z[4];
      for (int k = 0; k < 4; ++k) z[k] = _mm256_inserti128_si256(_mm256_castsi128_si256(row(k)), row(k + 4), 1);
      const __m256i t0 = _mm256_unpacklo_epi32(z[0], z[1]), t1 = _mm256_unpackhi_epi32(z[0], z[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(z[2], z[3]), t3 = _mm256_unpackhi_epi32(z[2], z[3]);
      const __m256i d[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                            _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
      uint8_t* at = codes + 8 * b * kGroupBytes + 32 * u;
      for (int m = 0; m < 4; ++m) {
        const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(d[m], nibble));
        const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(d[m], 4), nibble));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + 2 * m * kGroupBytes), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + (2 * m + 1) * kGroupBytes), hi);
      }
    }
  }
  pack_scales(scales, groups, row0, rows, wscale, special);
}

// panel_tile with AVX2, which has no vpdpbusd: per 4 groups of a block, vpmaddubsw products of the codes with the
// token's broadcast bytes are summed in int16 (at most 4 x 2 x 24 x 128 = 24576 per lane, no saturation), then
// vpmaddwd (x 256 for kFixed16's hi term, x 1 otherwise) sums them into int32 from minus the code offset's sum.
// The block's integers equal panel_tile's, and the fp32 FMA per (token, row, block) is the same, so both forms
// give the same bits. Two 8-row vectors per step (the panel in two halves), C tokens.
template <int C, int Mode>
LZ_TARGET_AVX2 void panel_tile_avx2(const uint8_t* codes, const float* wscale, const TokenPack& tp, int64_t t0,
                                    float* y, int64_t ldy, int64_t row0, int64_t rows) {
  constexpr bool kFixed16 = Mode == kTokensFixed16;
  constexpr int U = 2;  // 8-row vectors per step
  const int64_t groups = tp.groups, cols = tp.cols;
  const __m256i ones = _mm256_set1_epi16(1), k256 = _mm256_set1_epi16(256);
  const int8_t* hi[C];
  const int8_t* lo[C];
  for (int c = 0; c < C; ++c) {
    hi[c] = tp.hi.data() + (t0 + c) * cols;
    lo[c] = kFixed16 ? tp.lo.data() + (t0 + c) * cols : hi[c];
  }
  const auto bcast = [](const int8_t* p) LZ_TARGET_AVX2 {
    int32_t four;
    std::memcpy(&four, p, 4);
    return _mm256_set1_epi32(four);
  };
  for (int u0 = 0; u0 < kPanelRows / 8; u0 += U) {
    if (row0 + 8 * u0 >= rows) break;
    __m256 f[U][C];
    for (int u = 0; u < U; ++u)
      for (int c = 0; c < C; ++c) f[u][c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < groups; ++b) {
      const uint8_t* cb = codes + 8 * b * kGroupBytes + 32 * u0;
      __m256i sum[U][C];
      for (int c = 0; c < C; ++c) {
        const __m256i start = _mm256_set1_epi32(-tp.corr[(t0 + c) * groups + b]);
        for (int u = 0; u < U; ++u) sum[u][c] = start;
      }
      for (int h = 0; h < 8; h += 4) {
        __m256i p[U][C], q[U][C];
        for (int j = h; j < h + 4; ++j) {
          __m256i w[U];
          for (int u = 0; u < U; ++u)
            w[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cb + j * kGroupBytes + 32 * u));
          for (int c = 0; c < C; ++c) {
            const __m256i xp = bcast(hi[c] + 32 * b + 4 * j);
            const __m256i xq = kFixed16 ? bcast(lo[c] + 32 * b + 4 * j) : xp;
            for (int u = 0; u < U; ++u) {
              const __m256i a = _mm256_maddubs_epi16(w[u], xp);
              p[u][c] = j == h ? a : _mm256_add_epi16(p[u][c], a);
              if constexpr (kFixed16) {
                const __m256i d = _mm256_maddubs_epi16(w[u], xq);
                q[u][c] = j == h ? d : _mm256_add_epi16(q[u][c], d);
              }
            }
          }
        }
        for (int u = 0; u < U; ++u)
          for (int c = 0; c < C; ++c)
            sum[u][c] = kFixed16 ? _mm256_add_epi32(sum[u][c], _mm256_add_epi32(_mm256_madd_epi16(p[u][c], k256),
                                                                                _mm256_madd_epi16(q[u][c], ones)))
                                 : _mm256_add_epi32(sum[u][c], _mm256_madd_epi16(p[u][c], ones));
      }
      for (int u = 0; u < U; ++u) {
        const __m256 ws = _mm256_loadu_ps(wscale + b * kPanelRows + 8 * (u0 + u));
        for (int c = 0; c < C; ++c) {
          const __m256 hs = _mm256_set1_ps(tp.half_scale[(t0 + c) * groups + b]);
          f[u][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[u][c]), _mm256_mul_ps(ws, hs), f[u][c]);
        }
      }
    }
    for (int u = 0; u < U; ++u) {
      const int64_t r = row0 + 8 * (u0 + u);
      if (r >= rows) break;
      const int64_t valid = std::min<int64_t>(8, rows - r);
      for (int c = 0; c < C; ++c) {
        float* out = y + (t0 + c) * ldy + r;
        if (valid == 8) {
          _mm256_storeu_ps(out, f[u][c]);
        } else {
          alignas(32) float lanes[8];
          _mm256_store_ps(lanes, f[u][c]);
          std::copy(lanes, lanes + valid, out);
        }
      }
    }
  }
}

template <int Mode>
void panel_times_tokens(bool zmm, const uint8_t* codes, const float* wscale, const TokenPack& tp, int64_t n, float* y,
                        int64_t ldy, int64_t row0, int64_t rows) {
  for (int64_t t0 = 0; t0 < n; t0 += kTileTokens) {
    const int64_t c = std::min<int64_t>(kTileTokens, n - t0);
    if (zmm) {
      switch (c) {
        case 1: panel_tile<1, Mode>(codes, wscale, tp, t0, y, ldy, row0, rows); break;
        case 2: panel_tile<2, Mode>(codes, wscale, tp, t0, y, ldy, row0, rows); break;
        case 3: panel_tile<3, Mode>(codes, wscale, tp, t0, y, ldy, row0, rows); break;
        default: panel_tile<4, Mode>(codes, wscale, tp, t0, y, ldy, row0, rows); break;
      }
    } else {
      switch (c) {
        case 1: panel_tile_avx2<1, Mode>(codes, wscale, tp, t0, y, ldy, row0, rows); break;
        case 2: panel_tile_avx2<2, Mode>(codes, wscale, tp, t0, y, ldy, row0, rows); break;
        case 3: panel_tile_avx2<3, Mode>(codes, wscale, tp, t0, y, ldy, row0, rows); break;
        default: panel_tile_avx2<4, Mode>(codes, wscale, tp, t0, y, ldy, row0, rows); break;
      }
    }
  }
}
#endif

}  // namespace

bool mxfp4_gemm_q8_cpu(const StoredMatrix& w, const float* x, int64_t n, float* y, int64_t ldy, int tokens) {
#if defined(LAZARUS_AVX2_MATH)
  const bool zmm = use_avx512_vnni();
  if (!(zmm || use_avx2()) || w.format != Storage::kMXFP4 || (tokens != kTokensFixed16 && tokens != kTokensInt8))
    return false;
  if (n == 0 || w.rows == 0) return true;
  if (w.cols == 0) {
    for (int64_t i = 0; i < n; ++i) std::fill_n(y + i * ldy, w.rows, 0.0f);
    return true;
  }
  if (!all_finite(x, n * w.cols)) return false;  // declining writes nothing: every row is checked first
  const int64_t groups = w.cols / 32, panels = (w.rows + kPanelRows - 1) / kPanelRows;
  const auto* blocks = static_cast<const uint8_t*>(w.data);
  std::vector<uint8_t> special(static_cast<size_t>(w.rows), 0);
  TokenPack tp;  // one pass of at most kTokenChunk rows at a time: its memory stays bounded at any n
  for (int64_t t0 = 0; t0 < n; t0 += kTokenChunk) {
    const int64_t nt = std::min(kTokenChunk, n - t0);
    pack_tokens(x + t0 * w.cols, nt, w.cols, tokens, tp);
    float* yc = y + t0 * ldy;
    LZ_OMP(parallel) {
      std::vector<uint8_t> codes(static_cast<size_t>(8 * groups * kGroupBytes));
      std::vector<float> wscale(static_cast<size_t>(groups * kPanelRows));
      LZ_OMP(for schedule(dynamic))
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t row0 = p * kPanelRows;
        if (zmm) {
          pack_panel(blocks, w.scales, groups, row0, w.rows, codes.data(), wscale.data(), special.data());
        } else {
          pack_panel_avx2(blocks, w.scales, groups, row0, w.rows, codes.data(), wscale.data(), special.data());
        }
        if (tokens == kTokensFixed16) {
          panel_times_tokens<kTokensFixed16>(zmm, codes.data(), wscale.data(), tp, nt, yc, ldy, row0, w.rows);
        } else {
          panel_times_tokens<kTokensInt8>(zmm, codes.data(), wscale.data(), tp, nt, yc, ldy, row0, w.rows);
        }
      }
    }
  }
  // A row with a NaN or zero scale byte: the fp32 kernel on the unrounded token rows (the matrix-vector kernel's rule).
  for (int64_t r = 0; r < w.rows; ++r) {
    if (!special[r]) continue;
    const StoredMatrix row{Storage::kMXFP4, blocks + r * groups * 16, w.scales + r * groups, 1, w.cols};
    stored_matvec_cpu(row, x, nullptr, n, y + r, ldy, kTokensFp32);
  }
  return true;
#else
  (void)w, (void)x, (void)n, (void)y, (void)ldy, (void)tokens;
  return false;
#endif
}

}  // namespace lazarus
