// Why: the overlay's low-rank stages on the GPU.
// - shrink: s[p] = B[e(p)] @ inp[row(p)] for every (token, expert) pair, one warp per output element
//   (a coalesced dot over the input dimension), so no per-expert GEMM launches and no host sync.
// - fused expand + bias + activation + weighted sum: a block is 32 columns x kRankSlices warps; each
//   warp adds one interleaved slice of the rank sum (overlay_moe_math.h), the partials meet in shared
//   memory, and one warp finishes the column. Each h and each weighted sum is written by exactly one
//   thread (deterministic, no atomics); small T still fills the GPU because the rank is split.
#include <cuda_runtime.h>

#include "overlay_moe/overlay_moe.h"
#include "overlay_moe/overlay_moe_math.h"

namespace lazarus {
namespace {

constexpr int kCols = 32;                       // columns per block (one per lane)
constexpr int kSlices = overlay::kRankSlices;   // warps per block, one rank slice each

__global__ void shrink_kernel(const float* __restrict__ inp, const int64_t* __restrict__ rows,
                              const int64_t* __restrict__ pair_expert, const float* __restrict__ b,
                              float* __restrict__ s, int64_t in_dim, int64_t rank) {
  const int64_t p = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (j >= rank) return;
  const int64_t row = rows ? rows[p] : p;
  const float* x = inp + row * in_dim;
  const float* bj = b + (pair_expert[p] * rank + j) * in_dim;
  float acc = 0.0f;
  for (int64_t k = lane; k < in_dim; k += 32) acc += bj[k] * x[k];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) s[p * rank + j] = acc;
}

__global__ void gate_up_kernel(OverlayGateUpArgs a, const int64_t* slot_pair, const int64_t* slot_expert,
                               int64_t top_k) {
  __shared__ float partial[2][kSlices][kCols];
  const int64_t t = blockIdx.y;
  const int lane = threadIdx.x, q = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + lane;
  const bool in_range = c < a.inter;
  const int64_t I = a.inter, rg = a.rank_gate, ru = a.rank_up;
  float sum = 0.0f;
  for (int64_t k = 0; k < top_k; ++k) {
    const int64_t p = slot_pair[t * top_k + k];
    const int64_t e = slot_expert[t * top_k + k];
    const float* s = a.s_gu + p * (rg + ru);
    partial[0][q][lane] = in_range ? overlay::expand_slice(s, a.at_gate, e, rg, I, c, q) : 0.0f;
    partial[1][q][lane] = in_range ? overlay::expand_slice(s + rg, a.at_up, e, ru, I, c, q) : 0.0f;
    __syncthreads();
    if (q == 0 && in_range) {
      float g = a.gu0[t * 2 * I + c];
      float u = a.gu0[t * 2 * I + I + c];
      if (a.bias_gate) g += a.bias_gate[e * I + c];
      if (a.bias_up) u += a.bias_up[e * I + c];
      for (int i = 0; i < kSlices; ++i) {
        g += partial[0][i][lane];
        u += partial[1][i][lane];
      }
      const float h = overlay::activation(g, u, a.activation, a.alpha, a.limit);
      a.h[p * I + c] = h;
      sum += a.pair_weight[p] * h;
    }
    __syncthreads();
  }
  if (q == 0 && in_range) a.hw[t * I + c] = sum;
}

__global__ void down_kernel(OverlayDownArgs a, const int64_t* slot_pair, const int64_t* slot_expert, int64_t top_k) {
  __shared__ float partial[kSlices][kCols];
  const int64_t t = blockIdx.y;
  const int lane = threadIdx.x, q = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + lane;
  const bool in_range = c < a.hidden;
  const int64_t H = a.hidden, rd = a.rank_down;
  float sum = 0.0f;
  for (int64_t k = 0; k < top_k; ++k) {
    const int64_t p = slot_pair[t * top_k + k];
    const int64_t e = slot_expert[t * top_k + k];
    partial[q][lane] = in_range ? overlay::expand_slice(a.s_d + p * rd, a.at_down, e, rd, H, c, q) : 0.0f;
    __syncthreads();
    if (q == 0 && in_range) {
      float v = a.bias_down ? a.bias_down[e * H + c] : 0.0f;
      for (int i = 0; i < kSlices; ++i) v += partial[i][lane];
      sum += a.pair_weight[p] * v;
    }
    __syncthreads();
  }
  if (q == 0 && in_range) a.y[t * H + c] += sum;
}

dim3 grid_for(int64_t cols, int64_t tokens) {
  return dim3(static_cast<unsigned>((cols + kCols - 1) / kCols), static_cast<unsigned>(tokens));
}

}  // namespace

int overlay_shrink_cuda(const float* inp, const int64_t* rows, const int64_t* pair_expert, const float* b, float* s,
                        int64_t pairs, int64_t in_dim, int64_t rank, void* stream) {
  if (pairs == 0 || rank == 0) return 0;
  constexpr int kWarps = 8;
  const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>((rank + kWarps - 1) / kWarps));
  shrink_kernel<<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(inp, rows, pair_expert, b, s, in_dim,
                                                                               rank);
  return static_cast<int>(cudaGetLastError());
}

int overlay_gate_up_cuda(const OverlayGateUpArgs& a, const int64_t* slot_pair, const int64_t* slot_expert,
                         int64_t top_k, void* stream) {
  if (a.tokens == 0 || a.inter == 0) return 0;
  gate_up_kernel<<<grid_for(a.inter, a.tokens), dim3(kCols, kSlices), 0, static_cast<cudaStream_t>(stream)>>>(
      a, slot_pair, slot_expert, top_k);
  return static_cast<int>(cudaGetLastError());
}

int overlay_down_cuda(const OverlayDownArgs& a, const int64_t* slot_pair, const int64_t* slot_expert, int64_t top_k,
                      void* stream) {
  if (a.tokens == 0 || a.hidden == 0) return 0;
  down_kernel<<<grid_for(a.hidden, a.tokens), dim3(kCols, kSlices), 0, static_cast<cudaStream_t>(stream)>>>(
      a, slot_pair, slot_expert, top_k);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lazarus
