// Why: the contract of the MXFP4 dequantisation kernels (CPU and CUDA share it).
//
// Inputs are dense and contiguous: `blocks` holds n_blocks * 16 bytes (32 E2M1 codes per block,
// element 2j in the low nibble of byte j, 2j+1 in the high nibble), `scales` holds n_blocks E8M0
// bytes, `out` holds n_blocks * 32 values. Scale 0xFF decodes the whole block to NaN; scale 0 is
// 2^-127 (subnormal, never flushed). The CPU functions cannot fail for valid pointers and sizes;
// the caller (the binding) checks sizes. The CUDA launchers return the launch error, if any.
#pragma once

#include <cstdint>

namespace lazarus {

void mxfp4_dequant_f32_cpu(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float* out);
void mxfp4_dequant_bf16_cpu(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, uint16_t* out);

#if defined(LAZARUS_WITH_CUDA)
// Pointers are device pointers; `stream` is a cudaStream_t passed as void* so this header needs no
// CUDA include. Returns a cudaError_t as int (0 on success).
int mxfp4_dequant_f32_cuda(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float* out, void* stream);
int mxfp4_dequant_bf16_cuda(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, uint16_t* out, void* stream);
#endif

}  // namespace lazarus

namespace lazarus {
namespace detail {
// The portable (non-SIMD) CPU path, bound separately so tests exercise the shared host/device
// arithmetic even on a machine where the AVX2 path is chosen.
void mxfp4_dequant_f32_portable(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float* out);
void mxfp4_dequant_bf16_portable(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, uint16_t* out);
}  // namespace detail
}  // namespace lazarus
