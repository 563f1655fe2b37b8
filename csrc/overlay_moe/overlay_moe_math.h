// Why: the overlay arithmetic shared by the CUDA kernels and their host twin (the CPU tests run it):
// the activations and one output element of a token's fused expand + activation + weighted sum.
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

LZ_HD float activation(float g, float u, int kind, float alpha, float limit) {
  if (kind == kGptOss) {
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    return g * sigmoid(alpha * g) * (u + 1.0f);
  }
  return g * sigmoid(g) * u;
}

// The rank sum of an expand, split into kRankSlices interleaved partial sums: slice q adds the terms
// j = q, q + kRankSlices, ... The CUDA kernels give each slice to its own warp and add the partials in
// slice order; the host twin below adds them in the same order.
constexpr int kRankSlices = 8;

// sum over j in slice q of s[j] * at[(e * r + j) * n + c]   (at = A[e]^T, [E, r, n])
LZ_HD float expand_slice(const float* s, const float* at, int64_t e, int64_t r, int64_t n, int64_t c, int q) {
  float acc = 0.0f;
  for (int64_t j = q; j < r; j += kRankSlices) acc += s[j] * at[(e * r + j) * n + c];
  return acc;
}

// Column c of token t: for each of its K pairs, h = act(gu0 + bias + A^T-expand of s_gu), stored to
// h[pair, c]; returns sum_k w_k h_k (the weighted sum hw[t, c]).
LZ_HD float gate_up_column(const OverlayGateUpArgs& a, const int64_t* slot_pair, const int64_t* slot_expert,
                           int64_t top_k, int64_t t, int64_t c) {
  const int64_t I = a.inter, rg = a.rank_gate, ru = a.rank_up;
  float sum = 0.0f;
  for (int64_t k = 0; k < top_k; ++k) {
    const int64_t p = slot_pair[t * top_k + k];
    const int64_t e = slot_expert[t * top_k + k];
    float g = a.gu0[t * 2 * I + c];
    float u = a.gu0[t * 2 * I + I + c];
    if (a.bias_gate) g += a.bias_gate[e * I + c];
    if (a.bias_up) u += a.bias_up[e * I + c];
    const float* s = a.s_gu + p * (rg + ru);
    for (int q = 0; q < kRankSlices; ++q) {
      g += expand_slice(s, a.at_gate, e, rg, I, c, q);
      u += expand_slice(s + rg, a.at_up, e, ru, I, c, q);
    }
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
    float v = a.bias_down ? a.bias_down[e * H + c] : 0.0f;
    for (int q = 0; q < kRankSlices; ++q) v += expand_slice(a.s_d + p * rd, a.at_down, e, rd, H, c, q);
    sum += a.pair_weight[p] * v;
  }
  return sum;
}

}  // namespace overlay
}  // namespace lazarus
