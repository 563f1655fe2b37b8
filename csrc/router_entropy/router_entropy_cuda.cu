// Why: router entropy on the GPU: one warp per row (grid-stride over rows), the logits read once into
// registers/L1 and converted to fp32, warp-shuffle max and sums, the prob_sum column sums gathered per
// block in shared memory (float64) and added to global memory with one float64 atomic per column per block.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "router_entropy/router_entropy.h"
#include "router_entropy/router_entropy_math.h"

namespace lazarus {
namespace {

namespace re = router_entropy;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxBlocks = 4096;
constexpr int64_t kMaxSharedExperts = 6144;  // 48 KiB of float64 partials per block

template <LogitDtype D>
__device__ __forceinline__ float load_logit(const void* logits, int64_t i) {
  if constexpr (D == LogitDtype::kF32) {
    return __ldg(static_cast<const float*>(logits) + i);
  } else if constexpr (D == LogitDtype::kF16) {
    return re::half_bits_to_float(__ldg(static_cast<const unsigned short*>(logits) + i));
  } else {
    return bf16_bits_to_float(__ldg(static_cast<const unsigned short*>(logits) + i));
  }
}

__device__ __forceinline__ float warp_max(float v) {
  // fmaxf drops NaN: NaNs are tracked separately
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

template <LogitDtype D, bool kSigmoid, bool kShared>
__global__ void __launch_bounds__(kThreads) router_entropy_kernel(const void* __restrict__ logits, int64_t rows,
                                                                  int64_t experts, float* __restrict__ entropy,
                                                                  double* __restrict__ prob_sum) {
  extern __shared__ double block_sum[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (kShared) {
    for (int64_t j = threadIdx.x; j < experts; j += blockDim.x) block_sum[j] = 0.0;
    __syncthreads();
  }
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows; row += warp_stride) {
    const int64_t base = row * experts;
    float y_max = -INFINITY;
    bool nan_seen = false;
    for (int64_t j = lane; j < experts; j += 32) {
      const float y = re::log_weight(load_logit<D>(logits, base + j), kSigmoid);
      nan_seen |= isnan(y);
      y_max = fmaxf(y_max, y);
    }
    y_max = warp_max(y_max);
    if (__any_sync(0xFFFFFFFFu, nan_seen)) y_max = NAN;
    float z = 0.0f, s = 0.0f;
    for (int64_t j = lane; j < experts; j += 32) {  // the row is in L1 now
      const float d = re::log_weight(load_logit<D>(logits, base + j), kSigmoid) - y_max;
      const float e = expf(d);
      z += e;
      s += re::weighted_shift(e, d);
    }
    z = warp_sum(z);
    s = warp_sum(s);
    if (lane == 0) entropy[row] = re::entropy_from_sums(z, s);
    const float inv_z = 1.0f / z;
    for (int64_t j = lane; j < experts; j += 32) {
      const float d = re::log_weight(load_logit<D>(logits, base + j), kSigmoid) - y_max;
      const double p = static_cast<double>(expf(d) * inv_z);
      if (kShared) {
        atomicAdd(&block_sum[j], p);
      } else {
        atomicAdd(&prob_sum[j], p);
      }
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < experts; j += blockDim.x) atomicAdd(&prob_sum[j], block_sum[j]);
  }
}

template <LogitDtype D, bool kSigmoid>
cudaError_t launch(const void* logits, int64_t rows, int64_t experts, float* entropy, double* prob_sum,
                   cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((rows + kWarps - 1) / kWarps, kMaxBlocks));
  if (experts <= kMaxSharedExperts) {
    const size_t shared = static_cast<size_t>(experts) * sizeof(double);
    router_entropy_kernel<D, kSigmoid, true><<<blocks, kThreads, shared, stream>>>(logits, rows, experts, entropy,
                                                                                    prob_sum);
  } else {
    router_entropy_kernel<D, kSigmoid, false><<<blocks, kThreads, 0, stream>>>(logits, rows, experts, entropy,
                                                                                prob_sum);
  }
  return cudaGetLastError();
}

template <LogitDtype D>
cudaError_t launch_scoring(const void* logits, int64_t rows, int64_t experts, RouterScoring scoring, float* entropy,
                           double* prob_sum, cudaStream_t stream) {
  return scoring == RouterScoring::kSigmoid ? launch<D, true>(logits, rows, experts, entropy, prob_sum, stream)
                                            : launch<D, false>(logits, rows, experts, entropy, prob_sum, stream);
}

}  // namespace

int router_entropy_rows_cuda(const void* logits, LogitDtype dtype, int64_t rows, int64_t experts,
                             RouterScoring scoring, float* entropy, double* prob_sum, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (experts <= 0) return 0;
  cudaError_t err = cudaMemsetAsync(prob_sum, 0, static_cast<size_t>(experts) * sizeof(double), stream);
  if (err != cudaSuccess || rows == 0) return static_cast<int>(err);
  switch (dtype) {
    case LogitDtype::kF16: err = launch_scoring<LogitDtype::kF16>(logits, rows, experts, scoring, entropy, prob_sum, stream); break;
    case LogitDtype::kBF16: err = launch_scoring<LogitDtype::kBF16>(logits, rows, experts, scoring, entropy, prob_sum, stream); break;
    default: err = launch_scoring<LogitDtype::kF32>(logits, rows, experts, scoring, entropy, prob_sum, stream); break;
  }
  return static_cast<int>(err);
}

}  // namespace lazarus
