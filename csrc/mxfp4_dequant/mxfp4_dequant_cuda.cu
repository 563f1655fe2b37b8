// Why: MXFP4 -> fp32/bf16 on the GPU. One thread decodes 4 packed bytes (8 values) with the same
// host/device arithmetic the CPU tests check; consecutive threads touch consecutive bytes.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/mxfp4_codec.h"
#include "mxfp4_dequant/mxfp4_dequant.h"

namespace lazarus {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 4;

struct F32Out {
  float* out;
  __device__ void store(int64_t i, float v) const { out[i] = v; }
};

struct Bf16Out {
  uint16_t* out;
  __device__ void store(int64_t i, float v) const { out[i] = float_to_bf16_bits(v); }
};

template <typename Out>
__global__ void mxfp4_dequant_kernel(const uint8_t* __restrict__ blocks, const uint8_t* __restrict__ scales,
                                     int64_t n_bytes, Out out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kBytesPerThread;
  for (int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kBytesPerThread;
       first < n_bytes; first += stride) {
#pragma unroll
    for (int k = 0; k < kBytesPerThread; ++k) {
      const int64_t byte_index = first + k;
      if (byte_index >= n_bytes) break;
      const float scale = mxfp4::e8m0_to_float(scales[byte_index / mxfp4::kBytesPerBlock]);
      float lo, hi;
      mxfp4::decode_byte(blocks[byte_index], scale, &lo, &hi);
      out.store(2 * byte_index, lo);
      out.store(2 * byte_index + 1, hi);
    }
  }
}

template <typename Out>
int launch(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, Out out, void* stream) {
  const int64_t n_bytes = n_blocks * mxfp4::kBytesPerBlock;
  if (n_bytes == 0) return 0;
  const int64_t threads_needed = (n_bytes + kBytesPerThread - 1) / kBytesPerThread;
  const int64_t grid = std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, 65535LL * 32);
  mxfp4_dequant_kernel<<<static_cast<unsigned>(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      blocks, scales, n_bytes, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int mxfp4_dequant_f32_cuda(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float* out, void* stream) {
  return launch(blocks, scales, n_blocks, F32Out{out}, stream);
}

int mxfp4_dequant_bf16_cuda(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, uint16_t* out,
                            void* stream) {
  return launch(blocks, scales, n_blocks, Bf16Out{out}, stream);
}

}  // namespace lazarus
