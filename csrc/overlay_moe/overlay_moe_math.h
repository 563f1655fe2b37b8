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
    for (int64_t j = 0; j < rg; ++j) g += s[j] * a.at_gate[(e * rg + j) * I + c];
    for (int64_t j = 0; j < ru; ++j) u += s[rg + j] * a.at_up[(e * ru + j) * I + c];
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
    const float* s = a.s_d + p * rd;
    for (int64_t j = 0; j < rd; ++j) v += s[j] * a.at_down[(e * rd + j) * H + c];
    sum += a.pair_weight[p] * v;
  }
  return sum;
}

}  // namespace overlay
}  // namespace lazarus
