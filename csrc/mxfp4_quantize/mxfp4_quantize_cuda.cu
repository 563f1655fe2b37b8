// Why: fp32 -> MXFP4 on the GPU, one thread per 32-value block, with the shared block quantiser.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/mxfp4_block.h"
#include "mxfp4_quantize/mxfp4_quantize.h"

namespace lazarus {
namespace {

constexpr int kThreads = 128;

__global__ void mxfp4_quantize_kernel(const float* __restrict__ w, int64_t n_blocks, uint8_t* __restrict__ blocks,
                                      uint8_t* __restrict__ scales) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < n_blocks; b += stride) {
    scales[b] = mxfp4::quantize_block(w + b * mxfp4::kValuesPerBlock, blocks + b * mxfp4::kBytesPerBlock);
  }
}

}  // namespace

int mxfp4_quantize_cuda(const float* w, int64_t n_blocks, uint8_t* blocks, uint8_t* scales, void* stream) {
  if (n_blocks == 0) return 0;
  const int64_t grid = std::min<int64_t>((n_blocks + kThreads - 1) / kThreads, 65535LL * 32);
  mxfp4_quantize_kernel<<<static_cast<unsigned>(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      w, n_blocks, blocks, scales);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lazarus
