// Why: binds the CUDA router-entropy launcher. Device buffers arrive as integer pointers from the
// Python op, which has already checked device, dtype, shape and contiguity of the tensors.
#include "router_entropy/router_entropy.h"

#include <cuda_runtime.h>

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {

void raise_on_cuda_error(int code, const char* what);

void bind_router_entropy(py::module_& m) {
  m.def(
      "router_entropy_rows",
      [](uintptr_t logits, int dtype, int64_t rows, int64_t experts, bool sigmoid, uintptr_t entropy,
         uintptr_t prob_sum, uintptr_t stream) {
        if (rows < 0 || experts < 1) throw py::value_error("need rows >= 0 and experts >= 1");
        if (dtype < 0 || dtype > 2) throw py::value_error("dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
        check_device_pointer(logits, "logits", rows);
        check_device_pointer(entropy, "entropy", rows);
        check_device_pointer(prob_sum, "prob_sum", experts);
        int code;
        {
          py::gil_scoped_release release;
          code = router_entropy_rows_cuda(reinterpret_cast<const void*>(logits), static_cast<LogitDtype>(dtype), rows,
                                          experts, sigmoid ? RouterScoring::kSigmoid : RouterScoring::kSoftmax,
                                          reinterpret_cast<float*>(entropy), reinterpret_cast<double*>(prob_sum),
                                          reinterpret_cast<void*>(stream));
        }
        raise_on_cuda_error(code, "router_entropy_rows");
      },
      py::arg("logits_ptr"), py::arg("dtype_code"), py::arg("rows"), py::arg("experts"), py::arg("sigmoid"),
      py::arg("entropy_ptr"), py::arg("prob_sum_ptr"), py::arg("stream"),
      "Device pointers: logits [rows, experts] (dtype_code 0 fp32, 1 fp16, 2 bf16) -> entropy float32 [rows], "
      "prob_sum float64 [experts] (zeroed, then accumulated).");
}

}  // namespace bindings
}  // namespace lazarus
