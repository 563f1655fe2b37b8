// Why: binds the CPU MXFP4 quantisation kernel.
#include "mxfp4_quantize/mxfp4_quantize.h"

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {

void bind_mxfp4_quantize(py::module_& m) {
  m.def(
      "mxfp4_quantize",
      [](const py::array& w, py::array blocks, py::array scales) {
        check_array<float>(w, "w", -1, "float32");
        if (w.size() % 32 != 0) throw py::value_error("w must hold a multiple of 32 values");
        const int64_t n_blocks = w.size() / 32;
        check_array<uint8_t>(blocks, "blocks", n_blocks * 16, "uint8");
        check_array<uint8_t>(scales, "scales", n_blocks, "uint8");
        check_writeable(blocks, "blocks");
        check_writeable(scales, "scales");
        const auto* src = static_cast<const float*>(w.data());
        auto* b = static_cast<uint8_t*>(blocks.mutable_data());
        auto* s = static_cast<uint8_t*>(scales.mutable_data());
        py::gil_scoped_release release;
        mxfp4_quantize_cpu(src, n_blocks, b, s);
      },
      py::arg("w"), py::arg("blocks"), py::arg("scales"),
      "w float32 [n * 32] (finite) -> blocks uint8 [n, 16], scales uint8 [n] (written in place).");
}

}  // namespace bindings
}  // namespace lazarus
