// Why: binds the CUDA overlay launchers; the Python op checks shapes, dtypes, devices and index ranges
// of the device tensors before their pointers arrive here.
#include "overlay_moe/overlay_moe.h"

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {

void raise_on_cuda_error(int code, const char* what);

namespace {
template <typename T>
T* p(uintptr_t v) { return reinterpret_cast<T*>(v); }
}  // namespace

void bind_overlay_moe(py::module_& m) {
  m.def(
      "overlay_gate_up",
      [](uintptr_t gu0, uintptr_t s_gu, uintptr_t pair_token, uintptr_t pair_weight, uintptr_t offsets,
         uintptr_t at_gate, uintptr_t at_up, uintptr_t bias_gate, uintptr_t bias_up, int activation, float alpha,
         float limit, uintptr_t h, uintptr_t hw, uintptr_t slot_pair, uintptr_t slot_expert, int64_t tokens,
         int64_t inter, int64_t experts, int64_t rank_gate, int64_t rank_up, int64_t top_k, uintptr_t stream) {
        if (tokens < 0 || inter < 0 || experts <= 0 || rank_gate < 0 || rank_up < 0 || top_k <= 0)
          throw py::value_error("overlay_gate_up: sizes must be non-negative (experts, top_k positive)");
        const int64_t P = tokens * top_k;
        for (auto [v, name] : {std::pair{gu0, "gu0"}, {pair_weight, "pair_weight"}, {h, "h"}, {hw, "hw"},
                               {slot_pair, "slot_pair"}, {slot_expert, "slot_expert"}})
          check_device_pointer(v, name, P * inter);
        const OverlayGateUpArgs a{p<const float>(gu0), p<const float>(s_gu), p<const int64_t>(pair_token),
                                  p<const float>(pair_weight), p<const int64_t>(offsets), p<const float>(at_gate),
                                  p<const float>(at_up), p<const float>(bias_gate), p<const float>(bias_up), tokens,
                                  inter, P, experts, rank_gate, rank_up, activation, alpha, limit, p<float>(h),
                                  p<float>(hw)};
        int code;
        {
          py::gil_scoped_release release;
          code = overlay_gate_up_cuda(a, p<const int64_t>(slot_pair), p<const int64_t>(slot_expert), top_k,
                                      reinterpret_cast<void*>(stream));
        }
        raise_on_cuda_error(code, "overlay_gate_up");
      });
  m.def(
      "overlay_down",
      [](uintptr_t s_d, uintptr_t pair_token, uintptr_t pair_weight, uintptr_t offsets, uintptr_t at_down,
         uintptr_t bias_down, uintptr_t y, uintptr_t slot_pair, uintptr_t slot_expert, int64_t tokens, int64_t hidden,
         int64_t experts, int64_t rank_down, int64_t top_k, uintptr_t stream) {
        if (tokens < 0 || hidden < 0 || experts <= 0 || rank_down < 0 || top_k <= 0)
          throw py::value_error("overlay_down: sizes must be non-negative (experts, top_k positive)");
        const int64_t P = tokens * top_k;
        for (auto [v, name] : {std::pair{pair_weight, "pair_weight"}, {y, "y"}, {slot_pair, "slot_pair"},
                               {slot_expert, "slot_expert"}})
          check_device_pointer(v, name, P * hidden);
        const OverlayDownArgs a{p<const float>(s_d), p<const int64_t>(pair_token), p<const float>(pair_weight),
                                p<const int64_t>(offsets), p<const float>(at_down), p<const float>(bias_down), tokens,
                                hidden, P, experts, rank_down, p<float>(y)};
        int code;
        {
          py::gil_scoped_release release;
          code = overlay_down_cuda(a, p<const int64_t>(slot_pair), p<const int64_t>(slot_expert), top_k,
                                   reinterpret_cast<void*>(stream));
        }
        raise_on_cuda_error(code, "overlay_down");
      });
  m.def(
      "overlay_shrink",
      [](uintptr_t inp, uintptr_t rows, uintptr_t pair_expert, uintptr_t b, uintptr_t s, int64_t pairs, int64_t in_dim,
         int64_t rank, uintptr_t stream) {
        if (pairs < 0 || in_dim < 0 || rank < 0)
          throw py::value_error("overlay_shrink: sizes must be non-negative");
        for (auto [v, name] : {std::pair{inp, "inp"}, {pair_expert, "pair_expert"}, {b, "b"}, {s, "s"}})
          check_device_pointer(v, name, pairs * rank);
        int code;
        {
          py::gil_scoped_release release;
          code = overlay_shrink_cuda(p<const float>(inp), p<const int64_t>(rows), p<const int64_t>(pair_expert),
                                     p<const float>(b), p<float>(s), pairs, in_dim, rank,
                                     reinterpret_cast<void*>(stream));
        }
        raise_on_cuda_error(code, "overlay_shrink");
      });
}

}  // namespace bindings
}  // namespace lazarus
