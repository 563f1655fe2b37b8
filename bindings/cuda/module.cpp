// Why: the CUDA extension lazarus_core._C_cuda (built when nvcc is found). It imports on a machine
// without a GPU or driver: cudart is linked statically and device queries report "no device".
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

namespace lazarus {
namespace bindings {
void bind_mxfp4_dequant(py::module_& m);
void bind_mxfp4_quantize(py::module_& m);
void bind_fp8_dequant(py::module_& m);
void bind_dequant_axpby(py::module_& m);
void bind_overlay_moe(py::module_& m);
void bind_router_entropy(py::module_& m);

void raise_on_cuda_error(int code, const char* what) {
  if (code != 0) {
    throw std::runtime_error(std::string(what) + ": CUDA error " + std::to_string(code) + " (" +
                             cudaGetErrorString(static_cast<cudaError_t>(code)) + ")");
  }
}
}  // namespace bindings
}  // namespace lazarus

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lazarus-core CUDA kernels (static cudart).";
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no driver" state
      return 0;
    }
    return n;
  }, "Number of CUDA devices visible to the runtime (0 without a GPU or driver).");
  m.def("device_status", []() {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return std::string("no CUDA device: ") + cudaGetErrorString(err);
    }
    return std::to_string(n) + " CUDA device(s)";
  }, "A sentence saying whether a CUDA device is present, and why not.");
  m.def("runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  lazarus::bindings::bind_mxfp4_dequant(m);
  lazarus::bindings::bind_mxfp4_quantize(m);
  lazarus::bindings::bind_fp8_dequant(m);
  lazarus::bindings::bind_dequant_axpby(m);
  lazarus::bindings::bind_overlay_moe(m);
  lazarus::bindings::bind_router_entropy(m);
}
