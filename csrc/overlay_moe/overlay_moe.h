// Why: the contract of the fused low-rank part of the overlay MoE forward. The dense base GEMMs and
// the grouped shrink products (x @ B[e]^T) go to BLAS/cuBLAS in the op layer; these kernels fuse what
// follows each of them: the per-expert expand A[e] s, the bias, the activation and the routing-weighted
// reduction over the k experts of each token, so the intermediate h never round-trips per expert.
//
// Layout (dense, C-contiguous; the binding checks sizes). Activations, products and outputs are fp32; the
// CPU kernels read the expand factors and biases in their stored type F (float, bf16_t or f16_t:
// OverlayGateUpArgsT<F>). The CUDA kernels have their own contract: overlay_moe_gpu.h.
// T tokens, K experts per token, P = T * K (token, expert) pairs SORTED BY EXPERT: pairs offsets[e] ..
// offsets[e+1]-1 use expert e.
//   gu0        [T, 2I]   base gate (columns 0..I-1) and up (I..2I-1) products x @ base^T
//   s_gu       [P, rg+ru] shrink of each pair: B_gate[e] x (first rg) then B_up[e] x
//   pair_token [P] int64  token of each sorted pair;  pair_weight [P] its routing weight
//   offsets    [E+1] int64, offsets[0] = 0, offsets[E] = P, non-decreasing
//   at_gate    [E, rg, I], at_up [E, ru, I]   expand factors TRANSPOSED (A[e]^T), rows contiguous
//   bias_gate, bias_up [E, I] or nullptr
//   activation 0: silu(g) * u;  1: GPT-OSS  g' = min(g, limit), u' = clamp(u, -limit, limit),
//              g' * sigmoid(alpha * g') * (u' + 1); the CPU clamps propagate NaN (as torch.clamp does)
// overlay_gate_up writes h [P, I] (activation of each pair) and hw [T, I] = sum over a token's pairs
// of pair_weight * h (overwritten, not accumulated).
// overlay_down accumulates y [T, H] += sum over pairs pair_weight * (A_down[e] s_d + bias_down[e]) with
// s_d [P, rd], at_down [E, rd, H], bias_down [E, H] or nullptr.
// Ranks may be 0. The CPU functions cannot fail (the binding validated everything).
#pragma once

#include <cstdint>

#include "common/float_bits.h"

namespace lazarus {

template <typename F>
struct OverlayGateUpArgsT {
  const float* gu0;
  const float* s_gu;
  const int64_t* pair_token;
  const float* pair_weight;
  const int64_t* offsets;
  const F* at_gate;
  const F* at_up;
  const F* bias_gate;
  const F* bias_up;
  int64_t tokens, inter, pairs, experts, rank_gate, rank_up;
  int activation;
  float alpha, limit;
  float* h;
  float* hw;
};
using OverlayGateUpArgs = OverlayGateUpArgsT<float>;

template <typename F>
struct OverlayDownArgsT {
  const float* s_d;
  const int64_t* pair_token;
  const float* pair_weight;
  const int64_t* offsets;
  const F* at_down;
  const F* bias_down;
  int64_t tokens, hidden, pairs, experts, rank_down;
  float* y;
};
using OverlayDownArgs = OverlayDownArgsT<float>;

// Instantiated for F = float, bf16_t, f16_t.
template <typename F>
void overlay_gate_up_cpu(const OverlayGateUpArgsT<F>& a);
template <typename F>
void overlay_down_cpu(const OverlayDownArgsT<F>& a);

// A row-major weight W [rows, cols] as stored: dense (kF32, kBF16, kF16: `data` holds rows * cols values) or
// MXFP4 (kMXFP4: `data` = blocks [rows, cols/32, 16], `scales` [rows, cols/32]; cols % 32 == 0).
struct StoredMatrix {
  Storage format;
  const void* data;
  const uint8_t* scales;
  int64_t rows, cols;
};

// How the matrix-vector kernel meets an MXFP4 weight's token rows (AVX2 only; elsewhere always fp32):
// kTokensFp32 converts every weight to fp32 and sums in fp32 (exact products); kTokensFixed16 rounds each x row
// per 32-element block to 16-bit fixed point with a power-of-two scale (each element off by at most 2^-14 of its
// block's largest |x|) and kTokensInt8 to int8 with scale max|x| / 127 (off by at most max|x| / 254); both then
// multiply and sum exactly in integers, one fp32 FMA per pair of blocks. A row holding inf or NaN, or a weight
// row with a NaN or zero scale byte, runs the fp32 kernel instead.
constexpr int kTokensFp32 = 0, kTokensFixed16 = 1, kTokensInt8 = 2;

// y[i, r] = sum_c W[r, c] * x[x_rows ? x_rows[i] : i, c] for i < n, r < w.rows: x fp32 rows of w.cols, y rows
// with stride ldy. MXFP4 is decoded in registers inside the product (the base GEMV of small batches); sums
// are fp32. `tokens` (one of kTokens*) as above. Cannot fail (the binding validated sizes and indices).
void stored_matvec_cpu(const StoredMatrix& w, const float* x, const int64_t* x_rows, int64_t n, float* y,
                       int64_t ldy, int tokens = kTokensFp32);

// y[i, r] = sum_c W[r, c] * x[i, c] for i < n (rows of w.cols, y rows with stride ldy) for an MXFP4 W and many
// token rows, with AVX-512 VNNI (where allowed, avx512_vnni_allowed) or AVX2, the same bits: each x row rounded per
// block as `tokens` (kTokensFixed16 or kTokensInt8) says, the products and block sums exact in integers, one fp32
// FMA per (token, row, block); a weight row with a NaN or zero scale byte runs the fp32 kernel. Returns false,
// writing nothing, when it cannot: no AVX2 here, another format or token mode, or an x row holding inf or NaN.
bool mxfp4_gemm_q8_cpu(const StoredMatrix& w, const float* x, int64_t n, float* y, int64_t ldy, int tokens);

// The grouped shrink of expert-sorted pairs: s[p, j] = sum_c B[e, j, c] * inp[rows ? rows[p] : p, c] for p in
// offsets[e] .. offsets[e+1]-1, with B = `b` viewed as [experts, rank, b.cols] (b.rows = experts * rank, a
// dense format). Experts with more than max_pairs pairs are skipped (the op runs those as a BLAS GEMM).
void overlay_shrink_cpu(const StoredMatrix& b, int64_t rank, const int64_t* offsets, int64_t experts,
                        int64_t max_pairs, const float* inp, const int64_t* rows, float* s);

// One product of each kind, run in ONE parallel region (a small batch's base GEMV and its grouped shrink read
// the same input): y = x[x_rows] @ W^T as stored_matvec_cpu and s as overlay_shrink_cpu. An empty problem
// (w.rows == 0 or n == 0; rank == 0 or experts == 0) is skipped.
struct MatvecProblem {
  StoredMatrix w{Storage::kF32, nullptr, nullptr, 0, 0};
  const float* x = nullptr;
  const int64_t* x_rows = nullptr;
  int64_t n = 0;
  float* y = nullptr;
  int64_t ldy = 0;
  int token_mode = kTokensFp32;  // MXFP4: how the kernel meets the token rows (see stored_matvec_cpu)
};
struct ShrinkProblem {
  StoredMatrix b{Storage::kF32, nullptr, nullptr, 0, 0};
  int64_t rank = 0;
  const int64_t* offsets = nullptr;
  int64_t experts = 0, max_pairs = 0;
  const float* inp = nullptr;
  const int64_t* rows = nullptr;
  float* s = nullptr;
};
void stored_matvec_and_shrink_cpu(const MatvecProblem& base, const ShrinkProblem& shrink);

// The whole forward of a small batch (the op runs it for T <= GEMV_MAX_ROWS) in ONE parallel region: the
// pairs sorted by expert here, then base gate/up GEMV + grouped shrink, expand + bias + activation + weighted
// sum, base down GEMV on the weighted sum + shrink of each pair's h, down expand + bias + weighted sum, each
// stage a worksharing loop. x [T, H] fp32, topk_ids [T, K] int64 in [0, E), topk_weights [T, K] fp32; the bases
// as stored ([2I, H] gate rows then up rows, and [H, I]); b_gate_up [E * (rg + ru), H] and b_down [E * rd, I]
// dense; at_*, bias_* as in OverlayGateUpArgsT / OverlayDownArgsT; y [T, H] written. `token_mode` as
// `tokens` of stored_matvec_cpu, for MXFP4 bases.
template <typename F>
struct SmallForwardT {
  const float* x;
  const int64_t* topk_ids;
  const float* topk_weights;
  int64_t tokens, top_k;
  StoredMatrix base_gate_up, base_down, b_gate_up, b_down;
  const F* at_gate;
  const F* at_up;
  const F* at_down;
  const F* bias_gate;
  const F* bias_up;
  const F* bias_down;
  int64_t experts, hidden, inter, rank_gate, rank_up, rank_down;
  int activation;
  float alpha, limit;
  int token_mode;
  float* y;
};
template <typename F>
void overlay_moe_small_cpu(const SmallForwardT<F>& a);

namespace detail {
// The shared host/device arithmetic of overlay_moe_math.h (activation, expand order) run per (token, column)
// on the host, bound for tests: same arguments as the CPU functions plus the inverse permutation
// (slot_pair [T*K]: slot t*K+k -> pair, slot_expert [T*K]).
void overlay_gate_up_portable_cpu(const OverlayGateUpArgs& a, const int64_t* slot_pair, const int64_t* slot_expert,
                                  int64_t top_k);
void overlay_down_portable_cpu(const OverlayDownArgs& a, const int64_t* slot_pair, const int64_t* slot_expert,
                               int64_t top_k);
}  // namespace detail

}  // namespace lazarus
