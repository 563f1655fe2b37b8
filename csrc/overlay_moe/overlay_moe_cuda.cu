// Why: the overlay fused expand + activation + weighted reduction on the GPU: one thread per (token,
// column) walks the token's k pairs through the shared host/device arithmetic (overlay_moe_math.h),
// so each h and each weighted sum is written by exactly one thread (deterministic, no atomics).
#include <cuda_runtime.h>

#include "overlay_moe/overlay_moe.h"
#include "overlay_moe/overlay_moe_math.h"

namespace lazarus {
namespace {

constexpr int kThreads = 256;

__global__ void gate_up_kernel(OverlayGateUpArgs a, const int64_t* slot_pair, const int64_t* slot_expert,
                               int64_t top_k) {
  const int64_t t = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < a.inter) a.hw[t * a.inter + c] = overlay::gate_up_column(a, slot_pair, slot_expert, top_k, t, c);
}

__global__ void down_kernel(OverlayDownArgs a, const int64_t* slot_pair, const int64_t* slot_expert, int64_t top_k) {
  const int64_t t = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < a.hidden) a.y[t * a.hidden + c] += overlay::down_column(a, slot_pair, slot_expert, top_k, t, c);
}

dim3 grid_for(int64_t cols, int64_t tokens) {
  return dim3(static_cast<unsigned>((cols + kThreads - 1) / kThreads), static_cast<unsigned>(tokens));
}

}  // namespace

int overlay_gate_up_cuda(const OverlayGateUpArgs& a, const int64_t* slot_pair, const int64_t* slot_expert,
                         int64_t top_k, void* stream) {
  if (a.tokens == 0 || a.inter == 0) return 0;
  gate_up_kernel<<<grid_for(a.inter, a.tokens), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      a, slot_pair, slot_expert, top_k);
  return static_cast<int>(cudaGetLastError());
}

int overlay_down_cuda(const OverlayDownArgs& a, const int64_t* slot_pair, const int64_t* slot_expert, int64_t top_k,
                      void* stream) {
  if (a.tokens == 0 || a.hidden == 0) return 0;
  down_kernel<<<grid_for(a.hidden, a.tokens), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      a, slot_pair, slot_expert, top_k);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lazarus
