// Why: binds the CPU block-scaled FP8 E4M3 dequantisation kernels (fp32 and bf16-bits output).
#include "fp8_dequant/fp8_dequant.h"

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {
namespace {

Fp8BlockShape checked_shape(int64_t batch, int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols) {
  if (batch < 0 || rows < 0 || cols < 0) throw py::value_error("batch, rows and cols must be >= 0");
  if (block_rows < 1 || block_cols < 1) throw py::value_error("block_rows and block_cols must be >= 1");
  return Fp8BlockShape{batch, rows, cols, block_rows, block_cols};
}

using DequantF32 = void (*)(const uint8_t*, const float*, Fp8BlockShape, float*);
using DequantBf16 = void (*)(const uint8_t*, const float*, Fp8BlockShape, uint16_t*);

void dequant(const py::array& weight, const py::array& scale_inv, py::array& out, const Fp8BlockShape& s,
             DequantF32 f32, DequantBf16 bf16) {
  const int64_t n = s.batch * s.rows * s.cols;
  const int64_t n_scales = s.batch * ((s.rows + s.block_rows - 1) / s.block_rows) *
                           ((s.cols + s.block_cols - 1) / s.block_cols);
  check_array<uint8_t>(weight, "weight", n, "uint8");
  check_array<float>(scale_inv, "scale_inv", n_scales, "float32");
  check_writeable(out, "out");
  const auto* w = static_cast<const uint8_t*>(weight.data());
  const auto* sc = static_cast<const float*>(scale_inv.data());
  if (out.dtype().kind() == 'f' && out.itemsize() == 4) {
    check_array<float>(out, "out", n, "float32");
    auto* o = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    f32(w, sc, s, o);
  } else if ((out.dtype().kind() == 'i' || out.dtype().kind() == 'u') && out.itemsize() == 2) {
    // bf16 travels as its 16-bit pattern (numpy has no bfloat16).
    if (!(out.flags() & py::array::c_style)) throw py::value_error("out must be C-contiguous");
    if (out.size() != n) {
      throw py::value_error("out has " + std::to_string(out.size()) + " elements, expected " + std::to_string(n));
    }
    auto* o = static_cast<uint16_t*>(out.mutable_data());
    py::gil_scoped_release release;
    bf16(w, sc, s, o);
  } else {
    throw py::type_error("out must be float32 or 16-bit bf16 bits, got " + std::string(py::str(out.dtype())));
  }
}

}  // namespace

void bind_fp8_dequant(py::module_& m) {
  m.def(
      "fp8_dequant",
      [](const py::array& weight, const py::array& scale_inv, py::array out, int64_t batch, int64_t rows, int64_t cols,
         int64_t block_rows, int64_t block_cols) {
        dequant(weight, scale_inv, out, checked_shape(batch, rows, cols, block_rows, block_cols), &fp8_dequant_f32_cpu,
                &fp8_dequant_bf16_cpu);
      },
      py::arg("weight"), py::arg("scale_inv"), py::arg("out"), py::arg("batch"), py::arg("rows"), py::arg("cols"),
      py::arg("block_rows"), py::arg("block_cols"),
      "weight uint8 E4M3FN [batch*rows*cols], scale_inv float32 [batch*ceil(rows/br)*ceil(cols/bc)] -> "
      "out [batch*rows*cols] (float32, or int16/uint16 holding bf16 bits). Uses AVX2 when the CPU has it.");
  m.def(
      "fp8_dequant_portable",
      [](const py::array& weight, const py::array& scale_inv, py::array out, int64_t batch, int64_t rows, int64_t cols,
         int64_t block_rows, int64_t block_cols) {
        dequant(weight, scale_inv, out, checked_shape(batch, rows, cols, block_rows, block_cols),
                &detail::fp8_dequant_f32_portable, &detail::fp8_dequant_bf16_portable);
      },
      py::arg("weight"), py::arg("scale_inv"), py::arg("out"), py::arg("batch"), py::arg("rows"), py::arg("cols"),
      py::arg("block_rows"), py::arg("block_cols"),
      "As fp8_dequant, through the portable table path built from the host/device codec the CUDA kernel runs.");
}

}  // namespace bindings
}  // namespace lazarus
