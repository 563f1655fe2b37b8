// Why: the contract of the MXFP4 quantisation kernels (CPU and CUDA share it).
//
// `w` holds n_blocks * 32 finite fp32 values (the caller rejects non-finite input). For each block of
// 32: scale = 2^ceil(log2(amax / 6)) clamped to [2^-127, 2^127] (never clips), elements rounded to
// the nearest E2M1 value with ties to the even code, saturating at 6; an all-zero block gets scale
// byte 0 and zero codes (a -0.0 keeps its sign bit). Writes n_blocks * 16 packed bytes to `blocks`
// and n_blocks scale bytes to `scales`. The CPU function cannot fail for valid pointers and sizes.
#pragma once

#include <cstdint>

namespace lazarus {

void mxfp4_quantize_cpu(const float* w, int64_t n_blocks, uint8_t* blocks, uint8_t* scales);

#if defined(LAZARUS_WITH_CUDA)
int mxfp4_quantize_cuda(const float* w, int64_t n_blocks, uint8_t* blocks, uint8_t* scales, void* stream);
#endif

}  // namespace lazarus
