// Why: the matrix-vector products of stored weights on the CPU: out[t] = dot(W row, x[t]) with W dense (fp32,
// bf16, fp16) or MXFP4, decoded in registers inside the product. They serve the base GEMV of small batches
// (stored_matvec_cpu), the grouped shrink of expert-sorted pairs (overlay_shrink_cpu) and both in one parallel
// region (stored_matvec_and_shrink_cpu, MatvecShrinkPlan for the one-call forward of overlay_moe_cpu.cpp). A
// weight row is applied to up to 4 tokens per pass (one token: 4 dense rows side by side, and in the AVX-512
// integer form 4 or 2 MXFP4 rows, which share the token's loads); MXFP4 rows meet their tokens in fp32 or, by
// default, rounded per block to 16-bit fixed point (or int8) in an integer kernel (mxfp4_q8_row.inc: AVX2, or
// ymm VNNI where the CPU has AVX-VNNI or AVX-512 VNNI; mxfp4_q8_row_zmm.inc: zmm with AVX-512 VNNI).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/avx2_math.h"
#include "common/cpu_kernels.h"
#include "common/float_bits.h"
#include "common/mxfp4_codec.h"
#include "common/stream_prefetch.h"
#include "overlay_moe/overlay_moe.h"
#include "overlay_moe/q8_blocks.h"
#include "overlay_moe/stored_matvec_cpu.h"

namespace lazarus {
namespace {

using q8::kCodeOffset;

constexpr int kMaxTokens = 4;         // token rows sharing one pass over a weight row
constexpr int kQ8Rows = 4;            // MXFP4 rows sharing one pass over one quantised token row (zmm form)
static_assert(kQ8Rows <= kMaxTokens, "rows_times_tokens collects a pass's outputs in out[kMaxTokens]");
constexpr int64_t kRowsPerItem = 16;  // weight rows per OpenMP work item of the shrink
// Base rows per work item: long runs keep each thread's stream contiguous for the prefetchers (a 2880-column
// MXFP4 row is 1.5 KB), and 5760 rows still make 90 items for the dynamic schedule to balance.
constexpr int64_t kBaseRowsPerItem = 64;
// kStreamAhead and kStreamAheadL2 (common/stream_prefetch.h): the prefetch distances along a streamed row.

// The two 64-byte lines at p + kStreamAhead into L1 and, except on AMD CPUs without AVX-512 (Zen 3 and older), at p +
// kStreamAheadL2 into L2 (prefetcht2), for a row streamed from DRAM. Measured on an Intel AVX-512 host (at 2 KB / 8
// KB): the T=1 forward 2-4 % faster than with the L1 prefetch alone (interleaved A/B, flushed, four runs); an L2
// prefetch alone or 4 or 16 KB ahead did worse. Presumably an L1 prefetch holds one of the core's few L1 miss buffers
// until its line comes, briefly when the line is already in L2. On an AMD Zen 3 host the far prefetcht2 made it slower:
// the T=1 forward took 1.07-1.12x as long as with the L1 prefetch alone (paired medians of 20-30 interleaved flushed
// rounds, 95 % intervals 1.01-1.14 and 1.06-1.19), and none at all or the L1 one 4 KB ahead were no better than both.
// On an AMD Zen 4 host (AVX-512) it helps again: in seven in-process A/B runs the T=1 forward without it took
// 1.01-1.04x as long (1.036x, 95 % interval 1.025-1.050, in one), and with no software prefetch at all 1.09x. Zen 5
// (AVX-512 too) has not been measured with it. The switch is decided when the library loads and read with a relaxed
// atomic load per step. Other forms of it measured worse on Zen 4: a function-local static (its guard checked per step)
// ran no faster than no far prefetch; with a namespace-scope bool, const or not, GCC 12 -O3 left no prefetcht2 in the
// kernels at all; read once per kernel call into a local it was 2.3 % slower than the per-step load (two A/B runs; why
// is not known).
bool far_prefetch_here() {
  __builtin_cpu_init();
  return !__builtin_cpu_is("amd") || __builtin_cpu_supports("avx512f");
}
std::atomic<bool> far_prefetch{far_prefetch_here()};

inline void prefetch_stream(const char* p) {
  _mm_prefetch(p + kStreamAhead, _MM_HINT_T0);
  _mm_prefetch(p + kStreamAhead + 64, _MM_HINT_T0);
  if (far_prefetch.load(std::memory_order_relaxed)) {
    _mm_prefetch(p + kStreamAheadL2, _MM_HINT_T2);
    _mm_prefetch(p + kStreamAheadL2 + 64, _MM_HINT_T2);
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
// The next kDotRows rows, up to `end`, are swept into L2 meanwhile (simd::SweepAhead).
constexpr int kDotRows = 4;
// The scalar tail of a row's dot, compiled once (not inlined) so the ymm and zmm forms share its exact code.
template <typename F>
__attribute__((noinline)) LZ_TARGET_AVX2 float dot_tail(const F* w, const float* x, int64_t c, int64_t cols) {
  float tail = 0.0f;
  for (int64_t k = c; k < cols; ++k) tail += to_float(w[k]) * x[k];
  return tail;
}

template <typename F>
LZ_TARGET_AVX2 void row_group_dots_avx2(const F* w, int64_t ld, const float* x, float* out, const F* end) {
  const int64_t cols = ld;
  __m256 acc[kDotRows][2];
  for (int i = 0; i < kDotRows; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  constexpr int64_t kPairCols = 128 / sizeof(F);  // columns of the two lines one prefetch_stream covers
  simd::SweepAhead ahead(w + kDotRows * ld, end);
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    ahead.step(kDotRows * 16 * sizeof(F));
    if (c % kPairCols == 0)  // the factor rows stream from DRAM at T=1 (-1 to -2 % on the forward, A/B)
      for (int i = 0; i < kDotRows; ++i) prefetch_stream(reinterpret_cast<const char*>(w + i * ld + c));
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
  for (int i = 0; i < kDotRows; ++i)
    out[i] = simd::hsum(_mm256_add_ps(acc[i][0], acc[i][1])) + dot_tail(w + i * ld, x, c, cols);
}

// row_group_dots_avx2 in zmm registers, the same bits: each row's zmm accumulator holds the ymm form's two (low
// half: columns c..c+7 of each 16, high half: c+8..c+15), split back for its 8-column step and final sum; half
// the instructions per weight byte (at T=1 the shrinks stream their factors from DRAM, and fewer instructions
// between the loads keep more of them in flight).
template <typename F>
LZ_TARGET_AVX512_VNNI void row_group_dots_zmm(const F* w, int64_t ld, const float* x, float* out, const F* end) {
  const int64_t cols = ld;
  __m512 acc[kDotRows];
  for (int i = 0; i < kDotRows; ++i) acc[i] = _mm512_setzero_ps();
  constexpr int64_t kPairCols = 128 / sizeof(F);
  simd::SweepAhead ahead(w + kDotRows * ld, end);
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    ahead.step(kDotRows * 16 * sizeof(F));
    if (c % kPairCols == 0)
      for (int i = 0; i < kDotRows; ++i) prefetch_stream(reinterpret_cast<const char*>(w + i * ld + c));
    const __m512 xv = _mm512_loadu_ps(x + c);
    for (int i = 0; i < kDotRows; ++i) acc[i] = _mm512_fmadd_ps(simd::load16(w + i * ld + c), xv, acc[i]);
  }
  __m256 lo[kDotRows], hi[kDotRows];
  for (int i = 0; i < kDotRows; ++i) {
    lo[i] = _mm512_castps512_ps256(acc[i]);
    hi[i] = _mm512_extractf32x8_ps(acc[i], 1);
  }
  for (; c + 8 <= cols; c += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + c);
    for (int i = 0; i < kDotRows; ++i) lo[i] = _mm256_fmadd_ps(simd::load8(w + i * ld + c), x0, lo[i]);
  }
  for (int i = 0; i < kDotRows; ++i)
    out[i] = simd::hsum(_mm256_add_ps(lo[i], hi[i])) + dot_tail(w + i * ld, x, c, cols);
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

// Token rows of the integer MXFP4 kernel (row_dots_mxfp4_q8), each block rounded as q8_blocks.h says.
// Stored per pair of blocks (2p, 2p+1), in the byte order the kernel's two nibble registers give the weights:
// [even elements of 2p | even of 2p+1][odd of 2p | odd of 2p+1] for each term (hi first), so one 32-byte load
// of codes meets one 32-byte load of tokens. half_scale[b] = scale / 2 (the code table holds twice each E2M1
// value), padded with zeros to a multiple of 8 blocks; corr[8p + l] = 12 * (sum of the values of int32 lane l),
// the offset the table's +12 adds (lanes 0-3: elements 8l..8l+7 of block 2p, lanes 4-7: of block 2p+1; in
// kFixed16 the value is N). An odd block count gets a zero pad block. `wide` (the AVX-512 form) interleaves the
// 32-byte slots of pairs 2s and 2s+1 (slot k of pair p at (p / 2) * 2 * pair_bytes + 64 k + 32 (p % 2)) and pads
// the pair count to even, so one 64-byte load meets two pairs' codes. quantize_for_mxfp4_q8 returns false
// (nothing usable) when a block holds inf or NaN.
int64_t q8_pair_bytes(int mode) { return mode == kTokensFixed16 ? 128 : 64; }
int64_t q8_scale_slots(int64_t groups) { return (groups + 7) / 8 * 8; }
int64_t q8_pairs(int64_t groups, bool wide) { return wide ? (groups + 3) / 4 * 2 : (groups + 1) / 2; }

#if defined(LAZARUS_AVX2_MATH)
// One block's 32 integers n (int8 range) as bytes: even elements to even[0..16), odd ones to odd[0..16).
LZ_TARGET_AVX2 inline void store_even_odd(__m256i n0, __m256i n1, __m256i n2, __m256i n3, int8_t* even,
                                          int8_t* odd) {
  // packs: per 128-bit lane dwords [n0 | n1 | n2 | n3] of elements 0-3 (lane 0) and 4-7 (lane 1) of each.
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(n0, n1), _mm256_packs_epi32(n2, n3));
  const __m256i ordered = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  const __m256i split = _mm256_shuffle_epi8(
      ordered, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  const __m256i eo = _mm256_permute4x64_epi64(split, 0xD8);  // [even 0-15 | even 16-31 | odd 0-15 | odd 16-31]
  _mm_storeu_si128(reinterpret_cast<__m128i*>(even), _mm256_castsi256_si128(eo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(odd), _mm256_extracti128_si256(eo, 1));
}

// quantize_for_mxfp4_q8's placement of one block's integers n[32] in registers (the same bytes and corr lanes
// as its scalar loop, below): slot k of the pair at pair + k * slot_stride, the block's half at byte offset `half`.
LZ_TARGET_AVX2 inline void place_block_avx2(const int32_t* n, int mode, int8_t* pair, int slot_stride, int half,
                                            int32_t* lanes) {
  __m256i v[4];
  for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(n + 8 * j));
  if (mode == kTokensFixed16) {
    __m256i hi[4], lo[4];
    for (int j = 0; j < 4; ++j) {  // hi = floor((N + 128) / 256), lo = N - 256 hi
      hi[j] = _mm256_srai_epi32(_mm256_add_epi32(v[j], _mm256_set1_epi32(128)), 8);
      lo[j] = _mm256_sub_epi32(v[j], _mm256_slli_epi32(hi[j], 8));
    }
    store_even_odd(hi[0], hi[1], hi[2], hi[3], pair + half, pair + slot_stride + half);
    store_even_odd(lo[0], lo[1], lo[2], lo[3], pair + 2 * slot_stride + half, pair + 3 * slot_stride + half);
  } else {
    store_even_odd(v[0], v[1], v[2], v[3], pair + half, pair + slot_stride + half);
  }
  // lanes[l] = kCodeOffset * (sum of elements 8l..8l+7): exact in int32.
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes), _mm_mullo_epi32(sums, _mm_set1_epi32(kCodeOffset)));
}
#endif

// Blocks [g0, g1) of one token row into its layout (above), which the caller has zeroed (TokenRows::layout):
// disjoint block ranges of a row may be filled by different threads.
bool quantize_for_mxfp4_q8(const float* x, int64_t g0, int64_t g1, int mode, bool wide, int8_t* q,
                           float* half_scale, int32_t* corr) {
  const int64_t pair_bytes = q8_pair_bytes(mode);
  int32_t n[32];
  for (int64_t g = g0; g < g1; ++g) {
    if (!q8::quantize_block_fast(x + 32 * g, mode, n, half_scale + g)) return false;
    const int64_t p = g / 2;
    int8_t* pair = wide ? q + (p / 2) * 2 * pair_bytes + 32 * (p % 2) : q + p * pair_bytes;
    const int slot_stride = wide ? 64 : 32;  // bytes from one 32-byte slot of the pair to the next
    const auto put = [&](int at, int32_t v) { pair[(at / 32) * slot_stride + at % 32] = static_cast<int8_t>(v); };
    int32_t* lanes = corr + p * 8 + (g % 2) * 4;
    const int half = static_cast<int>(g % 2) * 16;
#if defined(LAZARUS_AVX2_MATH)
    if (use_avx2()) {
      place_block_avx2(n, mode, pair, slot_stride, half, lanes);
      continue;
    }
#endif
    for (int i = 0; i < 32; ++i) {
      const int at = 32 * (i % 2) + half + i / 2;
      if (mode == kTokensFixed16) {
        const int32_t hi = (n[i] + 128) >> 8;  // floor((N + 128) / 256): lo = N - 256 hi in [-128, 127]
        put(at, hi);
        put(64 + at, n[i] - 256 * hi);
      } else {
        put(at, n[i]);
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

// The integer kernel row_dots_q8 (mxfp4_q8_row.inc) in its AVX2 form, its ymm VNNI form twice (AVX-VNNI's VEX
// vpdpbusd, AVX-512 VNNI's EVEX one), and (mxfp4_q8_row_zmm.inc) its AVX-512 VNNI zmm form.
namespace q8_avx2 {
#define LZ_Q8_TARGET LZ_TARGET_AVX2
#define LZ_Q8_VNNI 0
#include "overlay_moe/mxfp4_q8_row.inc"
#undef LZ_Q8_VNNI
#undef LZ_Q8_TARGET
}  // namespace q8_avx2

namespace q8_vnni {
#define LZ_Q8_TARGET LZ_TARGET_AVX_VNNI
#define LZ_Q8_VNNI 1
#define LZ_Q8_DPBUSD _mm256_dpbusd_avx_epi32
#include "overlay_moe/mxfp4_q8_row.inc"
#undef LZ_Q8_DPBUSD
#undef LZ_Q8_VNNI
#undef LZ_Q8_TARGET
}  // namespace q8_vnni

namespace q8_vnni_evex {
#define LZ_Q8_TARGET LZ_TARGET_AVX512_VNNI
#define LZ_Q8_VNNI 1
#define LZ_Q8_DPBUSD _mm256_dpbusd_epi32
#include "overlay_moe/mxfp4_q8_row.inc"
#undef LZ_Q8_DPBUSD
#undef LZ_Q8_VNNI
#undef LZ_Q8_TARGET
}  // namespace q8_vnni_evex

namespace q8_zmm {
#define LZ_ZMM_TARGET LZ_TARGET_AVX512_VNNI
#define LZ_ZMM_VBMI 0
#include "overlay_moe/mxfp4_q8_row_zmm.inc"
#undef LZ_ZMM_VBMI
#undef LZ_ZMM_TARGET
}  // namespace q8_zmm

namespace q8_zmm_vbmi {
#define LZ_ZMM_TARGET LZ_TARGET_AVX512_VBMI
#define LZ_ZMM_VBMI 1
#include "overlay_moe/mxfp4_q8_row_zmm.inc"
#undef LZ_ZMM_VBMI
#undef LZ_ZMM_TARGET
}  // namespace q8_zmm_vbmi

// The zmm form runs wherever the AVX-512 VNNI forms may (it reads the wide layout). It used to need AVX-VNNI too,
// which left CPUs with AVX-512 VNNI alone (AMD Zen 4, Intel Ice Lake / Cascade Lake) on the AVX2 form.
bool use_wide_q8() { return use_avx512_vnni(); }

// The integer kernel in the form the token rows were laid out for (wide: AVX-512 VNNI) or the widest ymm form
// this CPU runs (use_ymm_vnni: vpdpbusd in its VEX or EVEX encoding).
template <int Mode>
void row_dots_q8(const uint8_t* blocks, const uint8_t* scales, int64_t groups, const Q8Row* const* q, int nt,
                 float* out, bool wide) {
  if (wide && use_avx512_vbmi()) return q8_zmm_vbmi::row_dots_q8<Mode>(blocks, scales, groups, q, nt, out);
  if (wide) return q8_zmm::row_dots_q8<Mode>(blocks, scales, groups, q, nt, out);
  if (use_avx_vnni()) return q8_vnni::row_dots_q8<Mode>(blocks, scales, groups, q, nt, out);
  if (use_ymm_vnni()) return q8_vnni_evex::row_dots_q8<Mode>(blocks, scales, groups, q, nt, out);
  q8_avx2::row_dots_q8<Mode>(blocks, scales, groups, q, nt, out);
}

// out[r] = dot(row r, the one wide token row q[0]) for nr (4 or 2) consecutive rows, in the zmm form's VBMI
// decode where it runs (the same bits).
void row_group_dots_q8(const uint8_t* blocks, const uint8_t* scales, int64_t groups, const Q8Row* const* q,
                       float* out, int nr, int mode) {
  const bool vbmi = use_avx512_vbmi();
  if (mode == kTokensFixed16) {
    if (vbmi) {
      return nr == 4 ? q8_zmm_vbmi::row_group_dots_q8<4, kTokensFixed16>(blocks, scales, groups, q, out)
                     : q8_zmm_vbmi::row_group_dots_q8<2, kTokensFixed16>(blocks, scales, groups, q, out);
    }
    return nr == 4 ? q8_zmm::row_group_dots_q8<4, kTokensFixed16>(blocks, scales, groups, q, out)
                   : q8_zmm::row_group_dots_q8<2, kTokensFixed16>(blocks, scales, groups, q, out);
  }
  if (vbmi) {
    return nr == 4 ? q8_zmm_vbmi::row_group_dots_q8<4, kTokensInt8>(blocks, scales, groups, q, out)
                   : q8_zmm_vbmi::row_group_dots_q8<2, kTokensInt8>(blocks, scales, groups, q, out);
  }
  return nr == 4 ? q8_zmm::row_group_dots_q8<4, kTokensInt8>(blocks, scales, groups, q, out)
                 : q8_zmm::row_group_dots_q8<2, kTokensInt8>(blocks, scales, groups, q, out);
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
  bool wide = false;  // laid out for the AVX-512 form of the integer kernel

  bool quantized() const { return !q8_rows.empty(); }

  void prepare(const StoredMatrix& w, const float* x, const int64_t* x_rows, int64_t n, int tokens) {
    layout(w, x, x_rows, n, tokens);
    commit(fill(0, w.cols / 32));
  }

  // prepare() in three steps, for token rows an earlier stage of the same parallel region writes block by block:
  // layout() sizes and clears the buffers (nothing read from x yet), fill(g0, g1) permutes and rounds blocks
  // [g0, g1) of every row (threads may fill disjoint ranges; false when one holds inf or NaN), commit(finite)
  // makes the rounded rows usable when every block was finite (else the fp32 form alone is used).
  void layout(const StoredMatrix& w, const float* x, const int64_t* x_rows, int64_t n, int tokens) {
    const auto row = [&](int64_t i) { return x + (x_rows ? x_rows[i] : i) * w.cols; };
    f32.assign(static_cast<size_t>(n), nullptr);
    src.assign(static_cast<size_t>(n), nullptr);
    q8.clear();
    q8_rows.clear();
    mode = tokens;
    cols = w.cols;
    mxfp4 = w.format == Storage::kMXFP4 && use_avx2();
    if (!mxfp4) {
      for (int64_t i = 0; i < n; ++i) f32[i] = row(i);
      return;
    }
    permuted.resize(static_cast<size_t>(n * cols));
    for (int64_t i = 0; i < n; ++i) {
      src[i] = row(i);
      f32[i] = permuted.data() + i * cols;
    }
    if (tokens == kTokensFp32) return;
    wide = use_wide_q8();
    const int64_t groups = cols / 32, pairs = q8_pairs(groups, wide);
    q_bytes = pairs * q8_pair_bytes(tokens);
    slots = q8_scale_slots(groups);
    corr_lanes = pairs * 8;
    q_data.assign(static_cast<size_t>(n * q_bytes), 0);
    scale_data.assign(static_cast<size_t>(n * slots), 0.0f);
    corr_data.assign(static_cast<size_t>(n * corr_lanes), 0);
  }

  bool fill(int64_t g0, int64_t g1) {
    if (!mxfp4) return true;
    bool finite = true;
    for (size_t i = 0; i < src.size(); ++i) {
      permute_for_mxfp4(src[i] + 32 * g0, 32 * (g1 - g0), permuted.data() + i * cols + 32 * g0);
      if (mode != kTokensFp32)
        finite = quantize_for_mxfp4_q8(src[i], g0, g1, mode, wide, q_data.data() + i * q_bytes,
                                       scale_data.data() + i * slots, corr_data.data() + i * corr_lanes) &&
                 finite;
    }
    return finite;
  }

  void commit(bool finite) {
    if (!mxfp4 || mode == kTokensFp32 || !finite) return;
    for (size_t i = 0; i < src.size(); ++i)
      q8.push_back(
          Q8Row{q_data.data() + i * q_bytes, scale_data.data() + i * slots, corr_data.data() + i * corr_lanes});
    for (const Q8Row& r : q8) q8_rows.push_back(&r);
  }

 private:
  std::vector<const float*> src;
  int64_t cols = 0, q_bytes = 0, slots = 0, corr_lanes = 0;
  bool mxfp4 = false;
};

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
        // One token in the AVX-512 form: up to kQ8Rows consecutive rows (none with a special scale) in one pass.
        // Measured at the gpt-oss-20b layer (the T=1 forward, in-process A/B, Zen 4): 2 rows per pass 8-10 %
        // faster than 1 cold and 8-12 % warm (with the pass prefetched as one stream: each row's own stream
        // prefetched made it 4-6 % slower), 4 rows another 2.7 % cold and 5.3 % warm.
        const bool grouped = n == 1 && x.wide;
        int k = 0;  // (grouped) rows from r on before kQ8Rows, r1 or a row with a special scale
        if (grouped) {
          while (k < kQ8Rows && r + k < r1 && !special_scales(scales + k * groups, groups)) ++k;
          if (k > 1) {
            const Q8Row* const* q = x.q8_rows.data() + t_first;
            const int nr = k >= kQ8Rows ? kQ8Rows : 2;
            row_group_dots_q8(blocks, scales, groups, q, out, nr, x.mode);
            for (int i = 0; i < nr; ++i) y[r + i - r0] = out[i];
            r += nr - 1;
            continue;
          }
        }
        const bool special = grouped ? k == 0 : special_scales(scales, groups);
        for (int64_t t0 = 0; t0 < n; t0 += kMaxTokens) {
          const int nt = static_cast<int>(std::min<int64_t>(kMaxTokens, n - t0));
          if (special) {
            row_dots<uint8_t>(w, r, x.f32.data() + t_first + t0, nt, out);
          } else if (x.mode == kTokensFixed16) {
            row_dots_q8<kTokensFixed16>(blocks, scales, groups, x.q8_rows.data() + t_first + t0, nt, out, x.wide);
          } else {
            row_dots_q8<kTokensInt8>(blocks, scales, groups, x.q8_rows.data() + t_first + t0, nt, out, x.wide);
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
      const bool zmm = use_avx512_vnni();  // the AVX-512 forms' switch; the same bits either way
      const F* end = static_cast<const F*>(w.data) + w.rows * w.cols;  // the sweep's bound: the matrix
      for (; r + kDotRows <= r1; r += kDotRows) {
        const F* rows = static_cast<const F*>(w.data) + r * w.cols;
        if (zmm) {
          row_group_dots_zmm(rows, w.cols, xs[0], y + (r - r0), end);
        } else {
          row_group_dots_avx2(rows, w.cols, xs[0], y + (r - r0), end);
        }
      }
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

// The work items of MatvecShrinkPlan (stored_matvec_cpu.h): base items first, then (expert, first rank row).
// The first `bytes` of rows [r0, r1) of w requested into L2 (MXFP4: of its code bytes, and the same share of its
// scale bytes).
void prefetch_rows(const StoredMatrix& w, int64_t r0, int64_t r1, int64_t bytes) {
#if defined(__x86_64__) || defined(_M_X64)
  if (r1 <= r0 || bytes <= 0) return;
  if (w.format == Storage::kMXFP4) {
    const int64_t row = w.cols / 2, n = std::min(bytes, (r1 - r0) * row);
    simd::prefetch_l2(static_cast<const uint8_t*>(w.data) + r0 * row, n);
    simd::prefetch_l2(w.scales + r0 * (w.cols / 32), n / 16);
    return;
  }
  const int64_t size = w.format == Storage::kF32 ? 4 : 2, row = w.cols * size;
  simd::prefetch_l2(static_cast<const char*>(w.data) + r0 * row, std::min(bytes, (r1 - r0) * row));
#else
  (void)w, (void)r0, (void)r1, (void)bytes;
#endif
}

class MatvecShrinkItems {
 public:
  MatvecShrinkItems(const MatvecProblem& base, const ShrinkProblem& shrink) : base_(base), shrink_(shrink) {
    if (base.w.rows > 0 && base.n > 0) base_items_ = (base.w.rows + kBaseRowsPerItem - 1) / kBaseRowsPerItem;
    if (shrink.rank > 0 && shrink.experts > 0) {
      items_.reserve(static_cast<size_t>(std::min(shrink.experts, shrink.offsets[shrink.experts]) *
                                         ((shrink.rank + kRowsPerItem - 1) / kRowsPerItem)));
      for (int64_t e = 0; e < shrink.experts; ++e) {
        const int64_t n = shrink.offsets[e + 1] - shrink.offsets[e];
        if (n == 0 || n > shrink.max_pairs) continue;
        for (int64_t j0 = 0; j0 < shrink.rank; j0 += kRowsPerItem) items_.emplace_back(e, j0);
      }
    }
  }

  int64_t items() const { return base_items_ + static_cast<int64_t>(items_.size()); }
  int64_t base_items() const { return base_items_; }
  int64_t shrink_expert(int64_t it) const { return items_[it - base_items_].first; }

  void prepare_inputs() {
    layout_inputs();
    commit_inputs(fill_base_inputs(0, base_.w.cols));
  }

  // prepare_inputs() in steps (MatvecShrinkPlan); the shrink's rows are fp32 pointers, set by the layout.
  void layout_inputs() {
    if (base_items_) base_rows_.layout(base_.w, base_.x, base_.x_rows, base_.n, base_.token_mode);
    if (!items_.empty()) pair_rows_.prepare(shrink_.b, shrink_.inp, shrink_.rows, shrink_.offsets[shrink_.experts],
                                            kTokensFp32);
  }
  bool fill_base_inputs(int64_t c0, int64_t c1) { return base_items_ ? base_rows_.fill(c0 / 32, c1 / 32) : true; }
  void commit_inputs(bool finite) {
    if (base_items_) base_rows_.commit(finite);
  }

  void prefetch(int64_t it, int64_t bytes) const {
    if (it < base_items_) {
      const int64_t r0 = it * kBaseRowsPerItem;
      prefetch_rows(base_.w, r0, std::min(base_.w.rows, r0 + kBaseRowsPerItem), bytes);
      return;
    }
    const int64_t e = items_[it - base_items_].first, j0 = items_[it - base_items_].second;
    prefetch_rows(shrink_.b, e * shrink_.rank + j0, e * shrink_.rank + std::min(shrink_.rank, j0 + kRowsPerItem),
                  bytes);
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

}  // namespace

struct MatvecShrinkPlan::Impl {
  MatvecShrinkItems items;
};

MatvecShrinkPlan::MatvecShrinkPlan(const MatvecProblem& base, const ShrinkProblem& shrink)
    : impl_(new Impl{MatvecShrinkItems(base, shrink)}) {}
MatvecShrinkPlan::~MatvecShrinkPlan() = default;
int64_t MatvecShrinkPlan::items() const { return impl_->items.items(); }
int64_t MatvecShrinkPlan::base_items() const { return impl_->items.base_items(); }
int64_t MatvecShrinkPlan::shrink_expert(int64_t it) const { return impl_->items.shrink_expert(it); }
void MatvecShrinkPlan::prepare_inputs() { impl_->items.prepare_inputs(); }
void MatvecShrinkPlan::layout_inputs() { impl_->items.layout_inputs(); }
bool MatvecShrinkPlan::fill_base_inputs(int64_t c0, int64_t c1) { return impl_->items.fill_base_inputs(c0, c1); }
void MatvecShrinkPlan::commit_inputs(bool finite) { impl_->items.commit_inputs(finite); }
void MatvecShrinkPlan::run(int64_t it) const { impl_->items.run(it); }
void MatvecShrinkPlan::prefetch(int64_t it, int64_t bytes) const { impl_->items.prefetch(it, bytes); }

void stored_matvec_and_shrink_cpu(const MatvecProblem& base, const ShrinkProblem& shrink) {
  // One dynamic loop over both kinds of item, so a small batch is one parallel region and a descheduled
  // thread's share is taken by the others.
  MatvecShrinkItems plan(base, shrink);
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

}  // namespace lazarus
