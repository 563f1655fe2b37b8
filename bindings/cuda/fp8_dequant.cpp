// Why: binds the CUDA block-scaled FP8 E4M3 dequantisation launcher. Device buffers arrive as integer
// pointers from the Python op, which has already checked device, dtype, shape and contiguity.
#include "fp8_dequant/fp8_dequant.h"

#include <cuda_runtime.h>

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {

void raise_on_cuda_error(int code, const char* what);

void bind_fp8_dequant(py::module_& m) {
  m.def(
      "fp8_dequant",
      [](uintptr_t weight, uintptr_t scale_inv, uintptr_t out, int64_t batch, int64_t rows, int64_t cols,
         int64_t block_rows, int64_t block_cols, bool out_bf16, uintptr_t stream) {
        if (batch < 0 || rows < 0 || cols < 0) throw py::value_error("batch, rows and cols must be >= 0");
        if (block_rows < 1 || block_cols < 1) throw py::value_error("block_rows and block_cols must be >= 1");
        const int64_t n = batch * rows * cols;
        check_device_pointer(weight, "weight", n);
        check_device_pointer(scale_inv, "scale_inv", n);
        check_device_pointer(out, "out", n);
        const Fp8BlockShape s{batch, rows, cols, block_rows, block_cols};
        int code;
        {
          py::gil_scoped_release release;
          const auto* w = reinterpret_cast<const uint8_t*>(weight);
          const auto* sc = reinterpret_cast<const float*>(scale_inv);
          auto* st = reinterpret_cast<void*>(stream);
          code = out_bf16 ? fp8_dequant_bf16_cuda(w, sc, s, reinterpret_cast<uint16_t*>(out), st)
                          : fp8_dequant_f32_cuda(w, sc, s, reinterpret_cast<float*>(out), st);
        }
        raise_on_cuda_error(code, "fp8_dequant");
      },
      py::arg("weight_ptr"), py::arg("scale_inv_ptr"), py::arg("out_ptr"), py::arg("batch"), py::arg("rows"),
      py::arg("cols"), py::arg("block_rows"), py::arg("block_cols"), py::arg("out_bf16"), py::arg("stream"),
      "Device pointers: weight uint8 E4M3FN [batch, rows, cols], scale_inv float32 [batch, ceil(rows/br), "
      "ceil(cols/bc)] -> out fp32 (or bf16 if out_bf16).");
}

}  // namespace bindings
}  // namespace lazarus
