// Why: binds the CPU fused decode + axpby kernels (MXFP4 and bf16 sources; y and out may alias).
#include "dequant_axpby/dequant_axpby.h"

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {
namespace {

using Mxfp4Axpby = void (*)(const uint8_t*, const uint8_t*, int64_t, float, const float*, float, float*);

void check_y_out(const py::array& y, py::array& out, int64_t n) {
  check_array<float>(y, "y", n, "float32");
  check_array<float>(out, "out", n, "float32");
  check_writeable(out, "out");
}

void mxfp4_axpby(const py::array& blocks, const py::array& scales, float alpha, const py::array& y, float beta,
                 py::array out, Mxfp4Axpby fn) {
  check_array<uint8_t>(scales, "scales", -1, "uint8");
  const int64_t n_blocks = scales.size();
  check_array<uint8_t>(blocks, "blocks", n_blocks * 16, "uint8");
  check_y_out(y, out, n_blocks * 32);
  const auto* b = static_cast<const uint8_t*>(blocks.data());
  const auto* s = static_cast<const uint8_t*>(scales.data());
  const auto* yp = static_cast<const float*>(y.data());
  auto* o = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  fn(b, s, n_blocks, alpha, yp, beta, o);
}

}  // namespace

void bind_dequant_axpby(py::module_& m) {
  m.def(
      "mxfp4_axpby",
      [](const py::array& blocks, const py::array& scales, float alpha, const py::array& y, float beta, py::array out) {
        mxfp4_axpby(blocks, scales, alpha, y, beta, out, &mxfp4_axpby_cpu);
      },
      py::arg("blocks"), py::arg("scales"), py::arg("alpha"), py::arg("y"), py::arg("beta"), py::arg("out"),
      "out = alpha * mxfp4_decode(blocks [n,16], scales [n]) + beta * y; y, out float32 [n*32] (may alias).");
  m.def(
      "mxfp4_axpby_portable",
      [](const py::array& blocks, const py::array& scales, float alpha, const py::array& y, float beta, py::array out) {
        mxfp4_axpby(blocks, scales, alpha, y, beta, out, &detail::mxfp4_axpby_portable_cpu);
      },
      py::arg("blocks"), py::arg("scales"), py::arg("alpha"), py::arg("y"), py::arg("beta"), py::arg("out"),
      "As mxfp4_axpby through the portable host/device arithmetic (what the CUDA kernel runs).");
  m.def(
      "bf16_axpby",
      [](const py::array& src, float alpha, const py::array& y, float beta, py::array out) {
        if (src.itemsize() != 2 || !(src.dtype().kind() == 'i' || src.dtype().kind() == 'u')) {
          throw py::type_error("src must hold bf16 bits as int16/uint16, got " + std::string(py::str(src.dtype())));
        }
        if (!(src.flags() & py::array::c_style)) throw py::value_error("src must be C-contiguous");
        const int64_t n = src.size();
        check_y_out(y, out, n);
        const auto* s = static_cast<const uint16_t*>(src.data());
        const auto* yp = static_cast<const float*>(y.data());
        auto* o = static_cast<float*>(out.mutable_data());
        py::gil_scoped_release release;
        bf16_axpby_cpu(s, n, alpha, yp, beta, o);
      },
      py::arg("src"), py::arg("alpha"), py::arg("y"), py::arg("beta"), py::arg("out"),
      "out = alpha * float(src bf16 bits [n]) + beta * y; y, out float32 [n] (may alias).");
}

}  // namespace bindings
}  // namespace lazarus
