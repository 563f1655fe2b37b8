// Why: fused decode + axpby on the GPU (one thread per packed MXFP4 byte or bf16 value), with the
// shared host/device decode the CPU tests exercise.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/float_bits.h"
#include "common/mxfp4_codec.h"
#include "dequant_axpby/dequant_axpby.h"

namespace lazarus {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, 65535LL * 32));
}

__global__ void mxfp4_axpby_kernel(const uint8_t* __restrict__ blocks, const uint8_t* __restrict__ scales,
                                   int64_t n_bytes, float alpha, const float* y, float beta, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_bytes; i += stride) {
    float lo, hi;
    mxfp4::decode_byte(blocks[i], mxfp4::e8m0_to_float(scales[i / mxfp4::kBytesPerBlock]), &lo, &hi);
    const float2 yy = reinterpret_cast<const float2*>(y)[i];
    // __fmul_rn/__fadd_rn keep two roundings (no FMA contraction), matching the CPU paths.
    reinterpret_cast<float2*>(out)[i] = make_float2(__fadd_rn(__fmul_rn(alpha, lo), __fmul_rn(beta, yy.x)),
                                                    __fadd_rn(__fmul_rn(alpha, hi), __fmul_rn(beta, yy.y)));
  }
}

__global__ void bf16_axpby_kernel(const uint16_t* __restrict__ src, int64_t n, float alpha, const float* y, float beta,
                                  float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = __fadd_rn(__fmul_rn(alpha, bf16_bits_to_float(src[i])), __fmul_rn(beta, y[i]));
  }
}

}  // namespace

int mxfp4_axpby_cuda(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float alpha, const float* y,
                     float beta, float* out, void* stream) {
  const int64_t n_bytes = n_blocks * mxfp4::kBytesPerBlock;
  if (n_bytes == 0) return 0;
  mxfp4_axpby_kernel<<<grid_for(n_bytes), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(blocks, scales, n_bytes,
                                                                                              alpha, y, beta, out);
  return static_cast<int>(cudaGetLastError());
}

int bf16_axpby_cuda(const uint16_t* src, int64_t n, float alpha, const float* y, float beta, float* out, void* stream) {
  if (n == 0) return 0;
  bf16_axpby_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(src, n, alpha, y, beta, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lazarus
