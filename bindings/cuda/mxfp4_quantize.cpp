// Why: binds the CUDA MXFP4 quantisation launcher (device pointers checked by the Python op).
#include "mxfp4_quantize/mxfp4_quantize.h"

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {

void raise_on_cuda_error(int code, const char* what);

void bind_mxfp4_quantize(py::module_& m) {
  m.def(
      "mxfp4_quantize",
      [](uintptr_t w, int64_t n_blocks, uintptr_t blocks, uintptr_t scales, uintptr_t stream) {
        if (n_blocks < 0) throw py::value_error("n_blocks must be >= 0");
        check_device_pointer(w, "w", n_blocks);
        check_device_pointer(blocks, "blocks", n_blocks);
        check_device_pointer(scales, "scales", n_blocks);
        int code;
        {
          py::gil_scoped_release release;
          code = mxfp4_quantize_cuda(reinterpret_cast<const float*>(w), n_blocks, reinterpret_cast<uint8_t*>(blocks),
                                     reinterpret_cast<uint8_t*>(scales), reinterpret_cast<void*>(stream));
        }
        raise_on_cuda_error(code, "mxfp4_quantize");
      },
      py::arg("w_ptr"), py::arg("n_blocks"), py::arg("blocks_ptr"), py::arg("scales_ptr"), py::arg("stream"),
      "Device pointers: w float32 [n * 32] -> blocks uint8 [n, 16], scales uint8 [n].");
}

}  // namespace bindings
}  // namespace lazarus
