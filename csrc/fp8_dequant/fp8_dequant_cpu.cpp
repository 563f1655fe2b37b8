// Why: block-scaled FP8 E4M3 -> fp32/bf16 on the CPU: OpenMP over rows, a 256-entry decode table
// built from the shared host/device codec, one scale multiply per element.
#include "fp8_dequant/fp8_dequant.h"

#include <array>

#include "common/fp8_codec.h"

namespace lazarus {
namespace {

const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = fp8::e4m3fn_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

struct F32Sink {
  float* out;
  void store(int64_t i, float v) const { out[i] = v; }
};

struct Bf16Sink {
  uint16_t* out;
  void store(int64_t i, float v) const { out[i] = float_to_bf16_bits(v); }
};

template <typename Sink>
void dequant(const uint8_t* weight, const float* scale_inv, Fp8BlockShape s, Sink sink) {
  const std::array<float, 256>& table = e4m3_table();
  const int64_t scale_rows = (s.rows + s.block_rows - 1) / s.block_rows;
  const int64_t scale_cols = (s.cols + s.block_cols - 1) / s.block_cols;
  const int64_t total_rows = s.batch * s.rows;
#pragma omp parallel for schedule(static) if (total_rows * s.cols > (1 << 16))
  for (int64_t gr = 0; gr < total_rows; ++gr) {
    const int64_t b = gr / s.rows;
    const int64_t r = gr % s.rows;
    const float* scale_row = scale_inv + (b * scale_rows + r / s.block_rows) * scale_cols;
    const uint8_t* src = weight + gr * s.cols;
    const int64_t base = gr * s.cols;
    for (int64_t c0 = 0; c0 < s.cols; c0 += s.block_cols) {
      const float scale = scale_row[c0 / s.block_cols];
      const int64_t c1 = c0 + s.block_cols < s.cols ? c0 + s.block_cols : s.cols;
      for (int64_t c = c0; c < c1; ++c) sink.store(base + c, table[src[c]] * scale);
    }
  }
}

}  // namespace

void fp8_dequant_f32_cpu(const uint8_t* weight, const float* scale_inv, Fp8BlockShape shape, float* out) {
  dequant(weight, scale_inv, shape, F32Sink{out});
}

void fp8_dequant_bf16_cpu(const uint8_t* weight, const float* scale_inv, Fp8BlockShape shape, uint16_t* out) {
  dequant(weight, scale_inv, shape, Bf16Sink{out});
}

}  // namespace lazarus
