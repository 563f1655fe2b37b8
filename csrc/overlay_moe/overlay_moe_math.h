// Why: the overlay arithmetic shared by the CUDA kernels and their host twin (the CPU tests run it):
// the activations (NaN-propagating clamps) and one output element of a token's expand + activation + sum.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/float_bits.h"
#include "overlay_moe/overlay_moe.h"

namespace lazarus {
namespace overlay {

constexpr int kSwiglu = 0;
constexpr int kGptOss = 1;

LZ_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The GPT-OSS clamps are selects, not fminf/fmaxf: those return the non-NaN operand and turned a NaN gate
// or up into +-limit, while transformers (torch.clamp) keeps the NaN. A comparison with NaN is false, so
// the select passes a NaN through.
LZ_HD float clamp_max(float v, float hi) { return v > hi ? hi : v; }
LZ_HD float clamp_both(float v, float lo, float hi) { return v > hi ? hi : (v < lo ? lo : v); }

LZ_HD float activation(float g, float u, int kind, float alpha, float limit) {
  if (kind == kGptOss) {
    g = clamp_max(g, limit);
    u = clamp_both(u, -limit, limit);
    return g * sigmoid(alpha * g) * (u + 1.0f);
  }
  return g * sigmoid(g) * u;
}

// The rank sum of an expand in the order the CUDA tile kernels use (overlay_moe_cuda.cu, expand_tile):
// one fp32 accumulator per (pair, column), j ascending; the epilogue then adds base + sum + bias.
// sum over j of s[j] * at[(e * r + j) * n + c]   (at = A[e]^T, [E, r, n])
LZ_HD float expand_sum(const float* s, const float* at, int64_t e, int64_t r, int64_t n, int64_t c) {
  float acc = 0.0f;
  for (int64_t j = 0; j < r; ++j) acc += s[j] * at[(e * r + j) * n + c];
  return acc;
}

// Column c of token t: for each of its K pairs, h = act(gu0 + A^T-expand of s_gu + bias), stored to
// h[pair, c]; returns sum_k w_k h_k (the weighted sum hw[t, c]). The host twin of the CUDA arithmetic.
LZ_HD float gate_up_column(const OverlayGateUpArgs& a, const int64_t* slot_pair, const int64_t* slot_expert,
                           int64_t top_k, int64_t t, int64_t c) {
  const int64_t I = a.inter, rg = a.rank_gate, ru = a.rank_up;
  float sum = 0.0f;
  for (int64_t k = 0; k < top_k; ++k) {
    const int64_t p = slot_pair[t * top_k + k];
    const int64_t e = slot_expert[t * top_k + k];
    const float* s = a.s_gu + p * (rg + ru);
    const float g = a.gu0[t * 2 * I + c] + expand_sum(s, a.at_gate, e, rg, I, c) +
                    (a.bias_gate ? a.bias_gate[e * I + c] : 0.0f);
    const float u = a.gu0[t * 2 * I + I + c] + expand_sum(s + rg, a.at_up, e, ru, I, c) +
                    (a.bias_up ? a.bias_up[e * I + c] : 0.0f);
    const float h = activation(g, u, a.activation, a.alpha, a.limit);
    a.h[p * I + c] = h;
    sum += a.pair_weight[p] * h;
  }
  return sum;
}

// Column c of token t: sum over its K pairs of w_k * (A_down[e] s_d + bias_down[e])[c].
LZ_HD float down_column(const OverlayDownArgs& a, const int64_t* slot_pair, const int64_t* slot_expert, int64_t top_k,
                        int64_t t, int64_t c) {
  const int64_t H = a.hidden, rd = a.rank_down;
  float sum = 0.0f;
  for (int64_t k = 0; k < top_k; ++k) {
    const int64_t p = slot_pair[t * top_k + k];
    const int64_t e = slot_expert[t * top_k + k];
    const float v = expand_sum(a.s_d + p * rd, a.at_down, e, rd, H, c) + (a.bias_down ? a.bias_down[e * H + c] : 0.0f);
    sum += a.pair_weight[p] * v;
  }
  return sum;
}

}  // namespace overlay
}  // namespace lazarus
