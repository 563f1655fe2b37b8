// Why: the contract of the fused "decode + scale + add" kernels that stream expert weights: the
// running mean of experts (out = y + w / E) and the delta from the mean (out = w - base) each take one
// pass over memory instead of decode, convert and add as separate passes.
//
// out[i] = alpha * decode(src)[i] + beta * y[i] for n values; y and out are fp32 and MAY alias (an
// in-place accumulate), at any 4-byte alignment. Exact: the product alpha * w, the product beta * y and
// their sum are each rounded to fp32 on their own (round to nearest even), never contracted into an FMA
// (dequant_axpby_cpu.cpp is compiled with -ffp-contract=off; CUDA uses __fmul_rn/__fadd_rn). MXFP4 sources: n_blocks * 16 packed bytes + n_blocks scales, n = 32 * n_blocks
// (semantics of mxfp4_dequant). bf16 sources: n 16-bit patterns. Inputs are dense and contiguous; the
// binding checks sizes. The CPU functions cannot fail; the CUDA launchers return a cudaError_t as int.
#pragma once

#include <cstdint>

namespace lazarus {

void mxfp4_axpby_cpu(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float alpha, const float* y,
                     float beta, float* out);
void bf16_axpby_cpu(const uint16_t* src, int64_t n, float alpha, const float* y, float beta, float* out);

// Whether the CUDA MXFP4 kernel may read y and write out as float2 (both 8-byte aligned); otherwise it
// takes the scalar path. Host code (the CPU tests call it through the binding).
inline bool mxfp4_axpby_vector_path(const void* y, const void* out) {
  return reinterpret_cast<uintptr_t>(y) % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0;
}

#if defined(LAZARUS_WITH_CUDA)
int mxfp4_axpby_cuda(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float alpha, const float* y,
                     float beta, float* out, void* stream);
int bf16_axpby_cuda(const uint16_t* src, int64_t n, float alpha, const float* y, float beta, float* out, void* stream);
#endif

}  // namespace lazarus

namespace lazarus {
namespace detail {
// The portable MXFP4 path (the host/device arithmetic the CUDA kernel runs), bound for tests.
void mxfp4_axpby_portable_cpu(const uint8_t* blocks, const uint8_t* scales, int64_t n_blocks, float alpha,
                              const float* y, float beta, float* out);
}  // namespace detail
}  // namespace lazarus
