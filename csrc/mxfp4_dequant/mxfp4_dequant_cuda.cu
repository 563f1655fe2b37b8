// Why: MXFP4 -> fp32/bf16 on the GPU with the same host/device arithmetic the CPU tests check.
// Fast path: one thread decodes one 32-bit word (4 packed bytes -> 8 values; two words for bf16) and writes
// them with 16-byte vector stores; a scalar kernel handles buffers that are not aligned for that.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/mxfp4_codec.h"
#include "mxfp4_dequant/mxfp4_dequant.h"

namespace lazarus {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535LL * 32;

__device__ __forceinline__ void decode_word(uint32_t word, float scale, float v[8]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    mxfp4::decode_byte(static_cast<uint8_t>(word >> (8 * k)), scale, &v[2 * k], &v[2 * k + 1]);
  }
}

// n_words = n_blocks * 4; word w belongs to block w / 4.
__global__ void dequant_f32_vec(const uint32_t* __restrict__ words, const uint8_t* __restrict__ scales,
                                int64_t n_words, float4* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < n_words; w += stride) {
    float v[8];
    decode_word(words[w], mxfp4::e8m0_to_float(scales[w >> 2]), v);
    out[2 * w] = make_float4(v[0], v[1], v[2], v[3]);
    out[2 * w + 1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// Two words (16 values, 32 output bytes) per thread step: the same bytes in flight per thread as the fp32
// kernel. Words 2q and 2q+1 lie in one block (4 words per block).
__global__ void dequant_bf16_vec(const uint2* __restrict__ words, const uint8_t* __restrict__ scales,
                                 int64_t n_pairs, uint4* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n_pairs; q += stride) {
    const uint2 two = words[q];
    const float scale = mxfp4::e8m0_to_float(scales[q >> 1]);
    float v[16];
    decode_word(two.x, scale, v);
    decode_word(two.y, scale, v + 8);
    uint32_t packed[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      packed[k] = static_cast<uint32_t>(mxfp4::decoded_to_bf16_bits(v[2 * k])) |
                  (static_cast<uint32_t>(mxfp4::decoded_to_bf16_bits(v[2 * k + 1])) << 16);
    }
    out[2 * q] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    out[2 * q + 1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  }
}

template <typename T>
__global__ void dequant_scalar(const uint8_t* __restrict__ blocks, const uint8_t* __restrict__ scales,
                               int64_t n_bytes, T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_bytes; i += stride) {
    float lo, hi;
    mxfp4::decode_byte(blocks[i], mxfp4::e8m0_to_float(scales[i / mxfp4::kBytesPerBlock]), &lo, &hi);
    if constexpr (sizeof(T) == 4) {
      out[2 * i] = lo;
      out[2 * i + 1] = hi;
    } else {
      out[2 * i] = mxfp4::decoded_to_bf16_bits(lo);
      out[2 * i + 1] = mxfp4::decoded_to_bf16_bits(hi);
    }
  }
}

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxGrid));
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

int mxfp4_dequant_f32_cuda(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float* out, void* stream) {
  if (n_blocks == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t n_words = n_blocks * (mxfp4::kBytesPerBlock / 4);
  if (aligned(blocks, 4) && aligned(out, 16)) {
    dequant_f32_vec<<<grid_for(n_words), kThreads, 0, s>>>(reinterpret_cast<const uint32_t*>(blocks), scales, n_words,
                                                           reinterpret_cast<float4*>(out));
  } else {
    const int64_t n_bytes = n_blocks * mxfp4::kBytesPerBlock;
    dequant_scalar<float><<<grid_for(n_bytes), kThreads, 0, s>>>(blocks, scales, n_bytes, out);
  }
  return static_cast<int>(cudaGetLastError());
}

int mxfp4_dequant_bf16_cuda(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, uint16_t* out,
                            void* stream) {
  if (n_blocks == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t n_words = n_blocks * (mxfp4::kBytesPerBlock / 4);
  if (aligned(blocks, 8) && aligned(out, 16)) {
    const int64_t n_pairs = n_words / 2;  // n_words = 4 * n_blocks is even
    dequant_bf16_vec<<<grid_for(n_pairs), kThreads, 0, s>>>(reinterpret_cast<const uint2*>(blocks), scales, n_pairs,
                                                            reinterpret_cast<uint4*>(out));
  } else {
    const int64_t n_bytes = n_blocks * mxfp4::kBytesPerBlock;
    dequant_scalar<uint16_t><<<grid_for(n_bytes), kThreads, 0, s>>>(blocks, scales, n_bytes, out);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lazarus
