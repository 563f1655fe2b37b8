// Why: binds the CPU MXFP4 dequantisation kernels (fp32 and bf16-bits output, SIMD and portable).
#include "mxfp4_dequant/mxfp4_dequant.h"

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {
namespace {

using DequantF32 = void (*)(const uint8_t*, const uint8_t*, int64_t, float*);
using DequantBf16 = void (*)(const uint8_t*, const uint8_t*, int64_t, uint16_t*);

void dequant(const py::array& blocks, const py::array& scales, py::array& out, DequantF32 f32, DequantBf16 bf16) {
  check_array<uint8_t>(scales, "scales", -1, "uint8");
  const int64_t n_blocks = scales.size();
  check_array<uint8_t>(blocks, "blocks", n_blocks * 16, "uint8");
  check_writeable(out, "out");
  const auto* b = static_cast<const uint8_t*>(blocks.data());
  const auto* s = static_cast<const uint8_t*>(scales.data());
  if (out.dtype().kind() == 'f' && out.itemsize() == 4) {
    check_array<float>(out, "out", n_blocks * 32, "float32");
    auto* o = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    f32(b, s, n_blocks, o);
  } else if ((out.dtype().kind() == 'i' || out.dtype().kind() == 'u') && out.itemsize() == 2) {
    // bf16 travels as its 16-bit pattern (numpy has no bfloat16).
    if (!(out.flags() & py::array::c_style)) throw py::value_error("out must be C-contiguous");
    if (out.size() != n_blocks * 32) {
      throw py::value_error("out has " + std::to_string(out.size()) + " elements, expected " +
                            std::to_string(n_blocks * 32));
    }
    auto* o = static_cast<uint16_t*>(out.mutable_data());
    py::gil_scoped_release release;
    bf16(b, s, n_blocks, o);
  } else {
    throw py::type_error("out must be float32 or 16-bit bf16 bits, got " + std::string(py::str(out.dtype())));
  }
}

}  // namespace

void bind_mxfp4_dequant(py::module_& m) {
  m.def(
      "mxfp4_dequant",
      [](const py::array& blocks, const py::array& scales, py::array out) {
        dequant(blocks, scales, out, &mxfp4_dequant_f32_cpu, &mxfp4_dequant_bf16_cpu);
      },
      py::arg("blocks"), py::arg("scales"), py::arg("out"),
      "blocks uint8 [n, 16], scales uint8 [n] -> out [n * 32] (float32, or int16/uint16 holding bf16 bits). "
      "Uses AVX2 when the CPU has it.");
  m.def(
      "mxfp4_dequant_portable",
      [](const py::array& blocks, const py::array& scales, py::array out) {
        dequant(blocks, scales, out, &detail::mxfp4_dequant_f32_portable, &detail::mxfp4_dequant_bf16_portable);
      },
      py::arg("blocks"), py::arg("scales"), py::arg("out"),
      "As mxfp4_dequant, through the portable host/device code path (the arithmetic the CUDA kernel runs).");
}

}  // namespace bindings
}  // namespace lazarus
