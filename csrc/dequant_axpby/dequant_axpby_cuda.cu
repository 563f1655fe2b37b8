// Why: fused decode + axpby on the GPU (one thread per packed MXFP4 byte or bf16 value), with the
// shared host/device decode the CPU tests exercise. Every product and sum is rounded on its own (exact).
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

__device__ __forceinline__ float axpby(float alpha, float w, float beta, float y) {
  // __fmul_rn/__fadd_rn keep two roundings (no FMA contraction), matching the CPU paths.
  return __fadd_rn(__fmul_rn(alpha, w), __fmul_rn(beta, y));
}

// VECTOR: y and out are 8-byte aligned (mxfp4_axpby_vector_path), read and written as float2; otherwise
// (a view at an odd float offset) as two floats: a misaligned float2 access faults.
template <bool VECTOR>
__global__ void mxfp4_axpby_kernel(const uint8_t* __restrict__ blocks, const uint8_t* __restrict__ scales,
                                   int64_t n_bytes, float alpha, const float* y, float beta, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_bytes; i += stride) {
    float lo, hi;
    mxfp4::decode_byte(blocks[i], mxfp4::e8m0_to_float(scales[i / mxfp4::kBytesPerBlock]), &lo, &hi);
    if (VECTOR) {
      const float2 yy = reinterpret_cast<const float2*>(y)[i];
      reinterpret_cast<float2*>(out)[i] = make_float2(axpby(alpha, lo, beta, yy.x), axpby(alpha, hi, beta, yy.y));
    } else {
      const float y0 = y[2 * i], y1 = y[2 * i + 1];
      out[2 * i] = axpby(alpha, lo, beta, y0);
      out[2 * i + 1] = axpby(alpha, hi, beta, y1);
    }
  }
}

__global__ void bf16_axpby_kernel(const uint16_t* __restrict__ src, int64_t n, float alpha, const float* y, float beta,
                                  float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = axpby(alpha, bf16_bits_to_float(src[i]), beta, y[i]);
  }
}

}  // namespace

int mxfp4_axpby_cuda(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float alpha, const float* y,
                     float beta, float* out, void* stream) {
  const int64_t n_bytes = n_blocks * mxfp4::kBytesPerBlock;
  if (n_bytes == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  if (mxfp4_axpby_vector_path(y, out)) {
    mxfp4_axpby_kernel<true><<<grid_for(n_bytes), kThreads, 0, s>>>(blocks, scales, n_bytes, alpha, y, beta, out);
  } else {
    mxfp4_axpby_kernel<false><<<grid_for(n_bytes), kThreads, 0, s>>>(blocks, scales, n_bytes, alpha, y, beta, out);
  }
  return static_cast<int>(cudaGetLastError());
}

int bf16_axpby_cuda(const uint16_t* src, int64_t n, float alpha, const float* y, float beta, float* out, void* stream) {
  if (n == 0) return 0;
  bf16_axpby_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(src, n, alpha, y, beta, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lazarus
