// Why: fp32 -> MXFP4 on the CPU (OpenMP over blocks) with the shared host/device block quantiser.
#include "mxfp4_quantize/mxfp4_quantize.h"

#include "common/mxfp4_block.h"

namespace lazarus {

void mxfp4_quantize_cpu(const float* w, int64_t n_blocks, uint8_t* blocks, uint8_t* scales) {
#pragma omp parallel for schedule(static) if (n_blocks > 1024)
  for (int64_t b = 0; b < n_blocks; ++b) {
    scales[b] = mxfp4::quantize_block(w + b * mxfp4::kValuesPerBlock, blocks + b * mxfp4::kBytesPerBlock);
  }
}

}  // namespace lazarus
