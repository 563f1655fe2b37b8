// Why: block-scaled FP8 E4M3 -> fp32/bf16 on the GPU, decoded with the same host/device arithmetic the
// CPU tests check. Fast path (cols a multiple of 16, 16-byte aligned buffers): one thread per 16 bytes
// of a row, one 16-byte load, one scale lookup when the 16 bytes share a scale block, 16-byte stores.
// A scalar grid-stride kernel handles every other shape.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/fp8_codec.h"
#include "fp8_dequant/fp8_dequant.h"

namespace lazarus {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535LL * 32;
constexpr int kChunk = 16;  // bytes per thread step on the fast path

struct F32Out {
  float* out;
  __device__ void store(int64_t i, float v) const { out[i] = v; }
  __device__ void store16(int64_t i, const float (&v)[kChunk]) const {
    float4* dst = reinterpret_cast<float4*>(out + i);
#pragma unroll
    for (int k = 0; k < kChunk / 4; ++k) dst[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
  }
};

struct Bf16Out {
  uint16_t* out;
  __device__ void store(int64_t i, float v) const { out[i] = float_to_bf16_bits(v); }
  __device__ void store16(int64_t i, const float (&v)[kChunk]) const {
    uint32_t packed[kChunk / 2];
#pragma unroll
    for (int k = 0; k < kChunk / 2; ++k) {
      packed[k] = static_cast<uint32_t>(float_to_bf16_bits(v[2 * k])) |
                  (static_cast<uint32_t>(float_to_bf16_bits(v[2 * k + 1])) << 16);
    }
    uint4* dst = reinterpret_cast<uint4*>(out + i);
    dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  }
};

template <typename Out>
__global__ void fp8_dequant_scalar(const uint8_t* __restrict__ weight, const float* __restrict__ scale_inv,
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

// cols % 16 == 0. Chunk q covers bytes [16q, 16q + 16) of the flat tensor, all in one row.
template <typename Out>
__global__ void fp8_dequant_vec(const uint4* __restrict__ weight, const float* __restrict__ scale_inv,
                                Fp8BlockShape s, int64_t n_chunks, Out out) {
  const int64_t chunks_per_row = s.cols / kChunk;
  const int64_t scale_rows = (s.rows + s.block_rows - 1) / s.block_rows;
  const int64_t scale_cols = (s.cols + s.block_cols - 1) / s.block_cols;
  const bool one_scale = s.block_cols % kChunk == 0;  // the 16 bytes never straddle a scale block
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n_chunks; q += stride) {
    const int64_t gr = q / chunks_per_row;
    const int64_t c0 = (q - gr * chunks_per_row) * kChunk;
    const float* scale_row = scale_inv + ((gr / s.rows) * scale_rows + (gr % s.rows) / s.block_rows) * scale_cols;
    const uint4 word = weight[q];
    const uint32_t parts[4] = {word.x, word.y, word.z, word.w};
    float v[kChunk];
    const float shared_scale = one_scale ? scale_row[c0 / s.block_cols] : 0.0f;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      const float scale = one_scale ? shared_scale : scale_row[(c0 + k) / s.block_cols];
      v[k] = fp8::e4m3fn_to_float(static_cast<uint8_t>(parts[k / 4] >> (8 * (k % 4)))) * scale;
    }
    out.store16(q * kChunk, v);
  }
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxGrid));
}

template <typename Out>
int launch(const uint8_t* weight, const float* scale_inv, Fp8BlockShape s, Out out, void* stream) {
  const int64_t n = s.batch * s.rows * s.cols;
  if (n == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (s.cols % kChunk == 0 && aligned(weight, 16) && aligned(out.out, 16)) {
    const int64_t chunks = n / kChunk;
    fp8_dequant_vec<<<grid_for(chunks), kThreads, 0, st>>>(reinterpret_cast<const uint4*>(weight), scale_inv, s,
                                                           chunks, out);
  } else {
    fp8_dequant_scalar<<<grid_for(n), kThreads, 0, st>>>(weight, scale_inv, s, out);
  }
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
