// Why: the always-built CPU extension lazarus_core._C; one bind_<op> call per op.
#include <pybind11/pybind11.h>

#include "common/avx2_math.h"

#if defined(LAZARUS_WITH_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace lazarus {
namespace bindings {
void bind_mxfp4_dequant(py::module_& m);
void bind_mxfp4_quantize(py::module_& m);
void bind_fp8_dequant(py::module_& m);
void bind_dequant_axpby(py::module_& m);
void bind_overlay_moe(py::module_& m);
void bind_router_entropy(py::module_& m);
void bind_membench(py::module_& m);
}  // namespace bindings
}  // namespace lazarus

PYBIND11_MODULE(_C, m) {
  m.doc() = "lazarus-core CPU kernels (C++17, OpenMP when available).";
  m.def("has_openmp", []() {
#if defined(LAZARUS_WITH_OPENMP)
    return true;
#else
    return false;
#endif
  });
  m.def("max_threads", []() {
#if defined(LAZARUS_WITH_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("cpu_has_avx2", []() {
#if defined(__x86_64__) || defined(_M_X64)
    return static_cast<bool>(__builtin_cpu_supports("avx2"));
#else
    return false;
#endif
  });
  m.def("cpu_has_avx_vnni", []() {
#if defined(LAZARUS_AVX2_MATH)
    return lazarus::simd::cpu_has_avx_vnni();
#else
    return false;
#endif
  });
  m.def("cpu_has_ymm_vnni", []() {
#if defined(LAZARUS_AVX2_MATH)
    return lazarus::simd::cpu_has_ymm_vnni();
#else
    return false;
#endif
  }, "True when this CPU runs a ymm vpdpbusd form: AVX-VNNI (VEX) or AVX-512 VNNI + VL (EVEX; AMD Zen 4, Intel "
     "Ice Lake, which lack AVX-VNNI).");
  m.def(
      "set_avx_vnni",
      [](bool allowed) { return lazarus::avx_vnni_allowed().exchange(allowed); },
      py::arg("allowed"),
      "Allow (True, the default) or forbid the ymm vpdpbusd forms of the CPU kernels (AVX-VNNI, or AVX-512 VNNI's "
      "EVEX ymm form; forbidden: their AVX2 forms run where no zmm form may); returns the previous setting. Do not "
      "call while a kernel runs.");
  m.def("cpu_has_avx512_vnni", []() {
#if defined(LAZARUS_AVX2_MATH)
    return lazarus::simd::cpu_has_avx512_vnni();
#else
    return false;
#endif
  });
  m.def(
      "set_avx512_vnni",
      [](bool allowed) { return lazarus::avx512_vnni_allowed().exchange(allowed); },
      py::arg("allowed"),
      "Allow (True, the default) or forbid the AVX-512 VNNI forms of the CPU kernels (forbidden: the callers run "
      "their other paths); returns the previous setting. Do not call while a kernel runs.");
  m.def("cpu_has_avx512_vbmi", []() {
#if defined(LAZARUS_AVX2_MATH)
    return lazarus::simd::cpu_has_avx512_vbmi();
#else
    return false;
#endif
  }, "True when this CPU has AVX-512 VNNI and VBMI (vpermb; Ice Lake and AMD Zen 4 on, not Cascade Lake).");
  m.def(
      "set_avx512_vbmi",
      [](bool allowed) { return lazarus::avx512_vbmi_allowed().exchange(allowed); },
      py::arg("allowed"),
      "Allow (True, the default) or forbid the AVX-512 VBMI forms of the zmm CPU kernels (forbidden: their "
      "AVX-512 VNNI forms run, the same bits); returns the previous setting. Do not call while a kernel runs.");
  m.def("cpu_uses_avx512_vnni", []() { return lazarus::use_avx512_vnni(); },
        "True when the AVX-512 VNNI forms run now: compiled, on this CPU and allowed (set_avx512_vnni).");
  lazarus::bindings::bind_mxfp4_dequant(m);
  lazarus::bindings::bind_mxfp4_quantize(m);
  lazarus::bindings::bind_fp8_dequant(m);
  lazarus::bindings::bind_dequant_axpby(m);
  lazarus::bindings::bind_overlay_moe(m);
  lazarus::bindings::bind_router_entropy(m);
  lazarus::bindings::bind_membench(m);
}
