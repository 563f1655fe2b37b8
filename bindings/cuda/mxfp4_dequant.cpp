// Why: binds the CUDA MXFP4 dequantisation launcher. Device buffers arrive as integer pointers from
// the Python op, which has already checked device, dtype, shape and contiguity of the tensors.
#include "mxfp4_dequant/mxfp4_dequant.h"

#include <cuda_runtime.h>

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {

void raise_on_cuda_error(int code, const char* what);

void bind_mxfp4_dequant(py::module_& m) {
  m.def(
      "mxfp4_dequant",
      [](uintptr_t blocks, uintptr_t scales, int64_t n_blocks, uintptr_t out, bool out_bf16, uintptr_t stream) {
        if (n_blocks < 0) throw py::value_error("n_blocks must be >= 0");
        check_device_pointer(blocks, "blocks", n_blocks);
        check_device_pointer(scales, "scales", n_blocks);
        check_device_pointer(out, "out", n_blocks);
        int code;
        {
          py::gil_scoped_release release;
          const auto* b = reinterpret_cast<const uint8_t*>(blocks);
          const auto* s = reinterpret_cast<const uint8_t*>(scales);
          auto* st = reinterpret_cast<void*>(stream);
          code = out_bf16 ? mxfp4_dequant_bf16_cuda(b, s, n_blocks, reinterpret_cast<uint16_t*>(out), st)
                          : mxfp4_dequant_f32_cuda(b, s, n_blocks, reinterpret_cast<float*>(out), st);
        }
        raise_on_cuda_error(code, "mxfp4_dequant");
      },
      py::arg("blocks_ptr"), py::arg("scales_ptr"), py::arg("n_blocks"), py::arg("out_ptr"), py::arg("out_bf16"),
      py::arg("stream"),
      "Device pointers: blocks uint8 [n, 16], scales uint8 [n] -> out [n * 32] fp32 (or bf16 if out_bf16).");
}

}  // namespace bindings
}  // namespace lazarus
