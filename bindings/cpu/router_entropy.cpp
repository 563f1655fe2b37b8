// Why: binds the CPU router-entropy kernels (SIMD and portable): validates the arrays, releases the GIL.
#include "router_entropy/router_entropy.h"

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {
namespace {

using EntropyRows = void (*)(const void*, LogitDtype, int64_t, int64_t, RouterScoring, float*, double*);

LogitDtype parse_dtype(const std::string& name) {
  if (name == "float32") return LogitDtype::kF32;
  if (name == "float16") return LogitDtype::kF16;
  if (name == "bfloat16") return LogitDtype::kBF16;
  throw py::value_error("dtype must be 'float32', 'float16' or 'bfloat16', got '" + name + "'");
}

RouterScoring parse_scoring(const std::string& name) {
  if (name == "softmax") return RouterScoring::kSoftmax;
  if (name == "sigmoid") return RouterScoring::kSigmoid;
  throw py::value_error("scoring must be 'softmax' or 'sigmoid', got '" + name + "'");
}

void entropy_rows(const py::array& logits, const std::string& dtype_name, const std::string& scoring_name,
                  py::array& entropy, py::array& prob_sum, EntropyRows fn) {
  const LogitDtype dtype = parse_dtype(dtype_name);
  const RouterScoring scoring = parse_scoring(scoring_name);
  if (logits.ndim() != 2) throw py::value_error("logits must be 2-D [rows, experts]");
  const int64_t rows = logits.shape(0), experts = logits.shape(1);
  if (experts < 1) throw py::value_error("logits must have at least one expert column");
  const py::ssize_t itemsize = dtype == LogitDtype::kF32 ? 4 : 2;
  if (logits.itemsize() != itemsize) {
    throw py::type_error("logits must have " + std::to_string(itemsize) + "-byte items for dtype " + dtype_name +
                         ", got " + std::string(py::str(logits.dtype())));
  }
  if (!(logits.flags() & py::array::c_style)) throw py::value_error("logits must be C-contiguous");
  check_array<float>(entropy, "entropy", rows, "float32");
  check_array<double>(prob_sum, "prob_sum", experts, "float64");
  check_writeable(entropy, "entropy");
  check_writeable(prob_sum, "prob_sum");
  const void* x = logits.data();
  auto* h = static_cast<float*>(entropy.mutable_data());
  auto* p = static_cast<double*>(prob_sum.mutable_data());
  py::gil_scoped_release release;
  fn(x, dtype, rows, experts, scoring, h, p);
}

}  // namespace

void bind_router_entropy(py::module_& m) {
  m.def(
      "router_entropy_rows",
      [](const py::array& logits, const std::string& dtype, const std::string& scoring, py::array entropy,
         py::array prob_sum) { entropy_rows(logits, dtype, scoring, entropy, prob_sum, &router_entropy_rows_cpu); },
      py::arg("logits"), py::arg("dtype"), py::arg("scoring"), py::arg("entropy"), py::arg("prob_sum"),
      "logits [t, E] (float32, or 16-bit items holding float16 / bfloat16 bits, named by dtype) -> entropy "
      "float32 [t] (nats) and prob_sum float64 [E] (overwritten). Uses AVX2/F16C/FMA when the CPU has them.");
  m.def(
      "router_entropy_rows_portable",
      [](const py::array& logits, const std::string& dtype, const std::string& scoring, py::array entropy,
         py::array prob_sum) {
        entropy_rows(logits, dtype, scoring, entropy, prob_sum, &detail::router_entropy_rows_portable);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("scoring"), py::arg("entropy"), py::arg("prob_sum"),
      "As router_entropy_rows, through the portable host/device code path (the arithmetic the CUDA kernel runs).");
}

}  // namespace bindings
}  // namespace lazarus
