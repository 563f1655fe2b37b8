// Why: binds the memory-bandwidth probes the benchmark floors use (float32 numpy buffers).
#include "membench/membench.h"

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {

void bind_membench(py::module_& m) {
  m.def(
      "stream_fill",
      [](py::array dst, float value) {
        check_array<float>(dst, "dst", -1, "float32");
        check_writeable(dst, "dst");
        auto* d = static_cast<float*>(dst.mutable_data());
        const int64_t n = dst.size();
        py::gil_scoped_release release;
        stream_fill_cpu(d, n, value);
      },
      py::arg("dst"), py::arg("value"), "dst[:] = value with non-temporal stores (write-bandwidth probe).");
  m.def(
      "stream_copy",
      [](const py::array& src, py::array dst) {
        check_array<float>(src, "src", -1, "float32");
        check_array<float>(dst, "dst", src.size(), "float32");
        check_writeable(dst, "dst");
        const auto* s = static_cast<const float*>(src.data());
        auto* d = static_cast<float*>(dst.mutable_data());
        const int64_t n = src.size();
        py::gil_scoped_release release;
        stream_copy_cpu(s, d, n);
      },
      py::arg("src"), py::arg("dst"), "dst[:] = src with non-temporal stores (copy-bandwidth probe).");
  m.def(
      "stream_read",
      [](const py::array& src, int prefetch) {
        check_array<float>(src, "src", -1, "float32");
        if (prefetch != kPrefetchNone && prefetch != kPrefetchL1 && prefetch != kPrefetchL1L2 &&
            prefetch != kPrefetchKernels)
          throw py::value_error("prefetch must be 0 (none), 1 (L1), 2 (L1 and L2) or 3 (the kernels' distances), got " +
                                std::to_string(prefetch));
        const auto* s = static_cast<const float*>(src.data());
        const int64_t n = src.size();
        py::gil_scoped_release release;
        return stream_read_cpu(s, n, prefetch);
      },
      py::arg("src"), py::arg("prefetch") = static_cast<int>(kPrefetchL1L2),
      "sum(src) in float64 partials (read-bandwidth probe); prefetch: the software prefetch, 0 none, 1 each line "
      "2 KB ahead into L1, 2 that and 8 KB ahead into L2, 3 the GEMVs' distances (6 KB into L1, 16 KB into L2); which "
      "is fastest depends on the CPU.");
  m.def(
      "flush_cache",
      [](const py::array& buffer) {
        if (!(buffer.flags() & py::array::c_style)) throw py::value_error("buffer must be C-contiguous");
        const void* p = buffer.data();
        const int64_t bytes = static_cast<int64_t>(buffer.nbytes());
        py::gil_scoped_release release;
        return flush_cache_cpu(p, bytes);
      },
      py::arg("buffer"),
      "Evict every cache line of a C-contiguous array from every cache level (clflushopt / clflush), so its next "
      "read comes from DRAM. Returns False where this is not implemented (not x86-64).");
  m.def(
      "int8_dot_loop",
      [](int64_t iters) {
        if (iters < 1) throw py::value_error("int8_dot_loop: iters must be >= 1, got " + std::to_string(iters));
        py::gil_scoped_release release;
        return int8_dot_loop_cpu(iters);
      },
      py::arg("iters"),
      "Run iters steps of 16 independent u8 x s8 dot instructions per thread (zmm vpdpbusd, else ymm AVX-VNNI) "
      "and return the multiply-adds done (0 where the CPU has neither): the integer kernels' compute floor.");
}

}  // namespace bindings
}  // namespace lazarus
