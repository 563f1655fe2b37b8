// Why: the contract of the block-scaled FP8 E4M3 dequantisation kernels (DeepSeek-V3 expert weights;
// CPU and CUDA share it).
//
// Inputs are dense and contiguous: `weight` holds batch * rows * cols E4M3FN bytes (row-major
// [batch, rows, cols]); `scale_inv` holds batch * ceil(rows / block_rows) * ceil(cols / block_cols)
// float32 multipliers (row-major); out[b, r, c] = e4m3(weight[b, r, c]) * scale_inv[b, r / block_rows,
// c / block_cols], the product rounded once to fp32 (and then, for bf16 output, once more to bf16,
// round-to-nearest-even). NaN codes (0x7F, 0xFF) decode to NaN. The CPU functions cannot fail for
// valid pointers and sizes (block sizes >= 1); the binding checks sizes. The CUDA launchers return
// the launch error, if any.
#pragma once

#include <cstdint>

namespace lazarus {

struct Fp8BlockShape {
  int64_t batch;
  int64_t rows;
  int64_t cols;
  int64_t block_rows;
  int64_t block_cols;
};

void fp8_dequant_f32_cpu(const uint8_t* weight, const float* scale_inv, Fp8BlockShape shape, float* out);
void fp8_dequant_bf16_cpu(const uint8_t* weight, const float* scale_inv, Fp8BlockShape shape, uint16_t* out);

#if defined(LAZARUS_WITH_CUDA)
// Device pointers; `stream` is a cudaStream_t passed as void*. Returns a cudaError_t as int (0 = ok).
int fp8_dequant_f32_cuda(const uint8_t* weight, const float* scale_inv, Fp8BlockShape shape, float* out, void* stream);
int fp8_dequant_bf16_cuda(const uint8_t* weight, const float* scale_inv, Fp8BlockShape shape, uint16_t* out,
                          void* stream);
#endif

}  // namespace lazarus

namespace lazarus {
namespace detail {
// The portable (table) CPU path, bound separately so tests check it on a machine that has AVX2.
void fp8_dequant_f32_portable(const uint8_t* weight, const float* scale_inv, Fp8BlockShape shape, float* out);
void fp8_dequant_bf16_portable(const uint8_t* weight, const float* scale_inv, Fp8BlockShape shape, uint16_t* out);
}  // namespace detail
}  // namespace lazarus
