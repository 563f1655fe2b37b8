// Why: binds the CUDA fused decode + axpby launchers (device pointers checked by the Python op).
#include "dequant_axpby/dequant_axpby.h"

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {

void raise_on_cuda_error(int code, const char* what);

void bind_dequant_axpby(py::module_& m) {
  m.def(
      "mxfp4_axpby",
      [](uintptr_t blocks, uintptr_t scales, int64_t n_blocks, float alpha, uintptr_t y, float beta, uintptr_t out,
         uintptr_t stream) {
        if (n_blocks < 0) throw py::value_error("n_blocks must be >= 0");
        for (auto [p, name] : {std::pair{blocks, "blocks"}, {scales, "scales"}, {y, "y"}, {out, "out"}}) {
          check_device_pointer(p, name, n_blocks);
        }
        int code;
        {
          py::gil_scoped_release release;
          code = mxfp4_axpby_cuda(reinterpret_cast<const uint8_t*>(blocks), reinterpret_cast<const uint8_t*>(scales),
                                  n_blocks, alpha, reinterpret_cast<const float*>(y), beta,
                                  reinterpret_cast<float*>(out), reinterpret_cast<void*>(stream));
        }
        raise_on_cuda_error(code, "mxfp4_axpby");
      },
      py::arg("blocks_ptr"), py::arg("scales_ptr"), py::arg("n_blocks"), py::arg("alpha"), py::arg("y_ptr"),
      py::arg("beta"), py::arg("out_ptr"), py::arg("stream"));
  m.def(
      "bf16_axpby",
      [](uintptr_t src, int64_t n, float alpha, uintptr_t y, float beta, uintptr_t out, uintptr_t stream) {
        if (n < 0) throw py::value_error("n must be >= 0");
        for (auto [p, name] : {std::pair{src, "src"}, {y, "y"}, {out, "out"}}) check_device_pointer(p, name, n);
        int code;
        {
          py::gil_scoped_release release;
          code = bf16_axpby_cuda(reinterpret_cast<const uint16_t*>(src), n, alpha, reinterpret_cast<const float*>(y),
                                 beta, reinterpret_cast<float*>(out), reinterpret_cast<void*>(stream));
        }
        raise_on_cuda_error(code, "bf16_axpby");
      },
      py::arg("src_ptr"), py::arg("n"), py::arg("alpha"), py::arg("y_ptr"), py::arg("beta"), py::arg("out_ptr"),
      py::arg("stream"));
  m.def(
      "mxfp4_axpby_vector_path",
      [](uintptr_t y, uintptr_t out) {
        return mxfp4_axpby_vector_path(reinterpret_cast<const void*>(y), reinterpret_cast<const void*>(out));
      },
      py::arg("y_ptr"), py::arg("out_ptr"),
      "Whether mxfp4_axpby reads y / writes out as float2 (both 8-byte aligned) or takes the scalar path.");
}

}  // namespace bindings
}  // namespace lazarus
