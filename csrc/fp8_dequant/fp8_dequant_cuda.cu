// Why: block-scaled FP8 E4M3 -> fp32/bf16 on the GPU: a grid-stride loop, one element per thread
// step, decoded with the same host/device arithmetic the CPU tests check.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/fp8_codec.h"
#include "fp8_dequant/fp8_dequant.h"

namespace lazarus {
namespace {

constexpr int kThreads = 256;

struct F32Out {
  float* out;
  __device__ void store(int64_t i, float v) const { out[i] = v; }
};

struct Bf16Out {
  uint16_t* out;
  __device__ void store(int64_t i, float v) const { out[i] = float_to_bf16_bits(v); }
};

template <typename Out>
__global__ void fp8_dequant_kernel(const uint8_t* __restrict__ weight, const float* __restrict__ scale_inv,
                                   Fp8BlockShape s, Out out) {
  const int64_t n = s.batch * s.rows * s.cols;
  const int64_t scale_rows = (s.rows + s.block_rows - 1) / s.block_rows;
  const int64_t scale_cols = (s.cols + s.block_cols - 1) / s.block_cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t c = i % s.cols;
    const int64_t gr = i / s.cols;
    const int64_t r = gr % s.rows;
    const int64_t b = gr / s.rows;
    const float scale = scale_inv[(b * scale_rows + r / s.block_rows) * scale_cols + c / s.block_cols];
    out.store(i, fp8::e4m3fn_to_float(weight[i]) * scale);
  }
}

template <typename Out>
int launch(const uint8_t* weight, const float* scale_inv, Fp8BlockShape s, Out out, void* stream) {
  const int64_t n = s.batch * s.rows * s.cols;
  if (n == 0) return 0;
  const int64_t grid = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 32);
  fp8_dequant_kernel<<<static_cast<unsigned>(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      weight, scale_inv, s, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int fp8_dequant_f32_cuda(const uint8_t* weight, const float* scale_inv, Fp8BlockShape shape, float* out, void* stream) {
  return launch(weight, scale_inv, shape, F32Out{out}, stream);
}

int fp8_dequant_bf16_cuda(const uint8_t* weight, const float* scale_inv, Fp8BlockShape shape, uint16_t* out,
                          void* stream) {
  return launch(weight, scale_inv, shape, Bf16Out{out}, stream);
}

}  // namespace lazarus
