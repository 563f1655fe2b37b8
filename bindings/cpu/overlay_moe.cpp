// Why: binds the CPU overlay kernels (fused expand + activation + weighted reduction), checking every
// shape, dtype and index range so a raw pointer never reads outside its buffer.
#include "overlay_moe/overlay_moe.h"

#include <string>

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {
namespace {

int64_t dim(const py::array& a, const char* name, int nd, int i) {
  if (a.ndim() != nd) {
    throw py::value_error(std::string(name) + " must have " + std::to_string(nd) + " dimensions, got " +
                          std::to_string(a.ndim()));
  }
  return a.shape(i);
}

template <typename T>
const T* ptr(const py::array& a) { return static_cast<const T*>(a.data()); }

const float* optional_bias(const py::object& bias, const char* name, int64_t n) {
  if (bias.is_none()) return nullptr;
  py::array b = bias.cast<py::array>();
  check_array<float>(b, name, n, "float32");
  return ptr<float>(b);
}

// offsets [E+1] non-decreasing from 0 to P; pair_token [P] in [0, T); returns nothing, raises ValueError.
void check_routing(const py::array& offsets, const py::array& pair_token, const py::array& pair_weight, int64_t E,
                   int64_t P, int64_t T) {
  check_array<int64_t>(offsets, "offsets", E + 1, "int64");
  check_array<int64_t>(pair_token, "pair_token", P, "int64");
  check_array<float>(pair_weight, "pair_weight", P, "float32");
  const int64_t* o = ptr<int64_t>(offsets);
  if (o[0] != 0 || o[E] != P) throw py::value_error("offsets must start at 0 and end at the number of pairs");
  for (int64_t e = 0; e < E; ++e)
    if (o[e + 1] < o[e]) throw py::value_error("offsets must be non-decreasing");
  const int64_t* tok = ptr<int64_t>(pair_token);
  for (int64_t p = 0; p < P; ++p)
    if (tok[p] < 0 || tok[p] >= T) throw py::value_error("pair_token holds a token index out of range");
}

void check_slots(const py::object& slot_pair, const py::object& slot_expert, int64_t T, int64_t K, int64_t P,
                 int64_t E) {
  py::array sp = slot_pair.cast<py::array>(), se = slot_expert.cast<py::array>();
  check_array<int64_t>(sp, "slot_pair", T * K, "int64");
  check_array<int64_t>(se, "slot_expert", T * K, "int64");
  for (int64_t i = 0; i < T * K; ++i) {
    if (ptr<int64_t>(sp)[i] < 0 || ptr<int64_t>(sp)[i] >= P) throw py::value_error("slot_pair out of range");
    if (ptr<int64_t>(se)[i] < 0 || ptr<int64_t>(se)[i] >= E) throw py::value_error("slot_expert out of range");
  }
}

OverlayGateUpArgs gate_up_args(const py::array& gu0, const py::array& s_gu, const py::array& pair_token,
                               const py::array& pair_weight, const py::array& offsets, const py::array& at_gate,
                               const py::array& at_up, const py::object& bias_gate, const py::object& bias_up,
                               int activation, float alpha, float limit, py::array& h, py::array& hw) {
  const int64_t E = dim(at_gate, "at_gate", 3, 0), rg = at_gate.shape(1), I = at_gate.shape(2);
  const int64_t ru = dim(at_up, "at_up", 3, 1);
  const int64_t T = dim(gu0, "gu0", 2, 0), P = dim(s_gu, "s_gu", 2, 0);
  if (activation != 0 && activation != 1) throw py::value_error("activation must be 0 (swiglu) or 1 (gpt_oss)");
  check_array<float>(gu0, "gu0", T * 2 * I, "float32");
  check_array<float>(s_gu, "s_gu", P * (rg + ru), "float32");
  check_array<float>(at_gate, "at_gate", E * rg * I, "float32");
  check_array<float>(at_up, "at_up", E * ru * I, "float32");
  check_array<float>(h, "h", P * I, "float32");
  check_array<float>(hw, "hw", T * I, "float32");
  check_writeable(h, "h");
  check_writeable(hw, "hw");
  check_routing(offsets, pair_token, pair_weight, E, P, T);
  return OverlayGateUpArgs{ptr<float>(gu0), ptr<float>(s_gu), ptr<int64_t>(pair_token), ptr<float>(pair_weight),
                           ptr<int64_t>(offsets), ptr<float>(at_gate), ptr<float>(at_up),
                           optional_bias(bias_gate, "bias_gate", E * I), optional_bias(bias_up, "bias_up", E * I),
                           T, I, P, E, rg, ru, activation, alpha, limit,
                           static_cast<float*>(h.mutable_data()), static_cast<float*>(hw.mutable_data())};
}

OverlayDownArgs down_args(const py::array& s_d, const py::array& pair_token, const py::array& pair_weight,
                          const py::array& offsets, const py::array& at_down, const py::object& bias_down,
                          py::array& y) {
  const int64_t E = dim(at_down, "at_down", 3, 0), rd = at_down.shape(1), H = at_down.shape(2);
  const int64_t T = dim(y, "y", 2, 0), P = dim(s_d, "s_d", 2, 0);
  check_array<float>(s_d, "s_d", P * rd, "float32");
  check_array<float>(at_down, "at_down", E * rd * H, "float32");
  check_array<float>(y, "y", T * H, "float32");
  check_writeable(y, "y");
  check_routing(offsets, pair_token, pair_weight, E, P, T);
  return OverlayDownArgs{ptr<float>(s_d), ptr<int64_t>(pair_token), ptr<float>(pair_weight), ptr<int64_t>(offsets),
                         ptr<float>(at_down), optional_bias(bias_down, "bias_down", E * H), T, H, P, E, rd,
                         static_cast<float*>(y.mutable_data())};
}

}  // namespace

void bind_overlay_moe(py::module_& m) {
  m.def(
      "overlay_gate_up",
      [](const py::array& gu0, const py::array& s_gu, const py::array& pair_token, const py::array& pair_weight,
         const py::array& offsets, const py::array& at_gate, const py::array& at_up, const py::object& bias_gate,
         const py::object& bias_up, int activation, float alpha, float limit, py::array h, py::array hw) {
        const OverlayGateUpArgs a = gate_up_args(gu0, s_gu, pair_token, pair_weight, offsets, at_gate, at_up,
                                                 bias_gate, bias_up, activation, alpha, limit, h, hw);
        py::gil_scoped_release release;
        overlay_gate_up_cpu(a);
      },
      py::arg("gu0"), py::arg("s_gu"), py::arg("pair_token"), py::arg("pair_weight"), py::arg("offsets"),
      py::arg("at_gate"), py::arg("at_up"), py::arg("bias_gate"), py::arg("bias_up"), py::arg("activation"),
      py::arg("alpha"), py::arg("limit"), py::arg("h"), py::arg("hw"),
      "h [P, I] = act(gu0[token] + bias + A^T-expand of s_gu) per expert-sorted pair; hw [T, I] = weighted sum.");
  m.def(
      "overlay_down",
      [](const py::array& s_d, const py::array& pair_token, const py::array& pair_weight, const py::array& offsets,
         const py::array& at_down, const py::object& bias_down, py::array y) {
        const OverlayDownArgs a = down_args(s_d, pair_token, pair_weight, offsets, at_down, bias_down, y);
        py::gil_scoped_release release;
        overlay_down_cpu(a);
      },
      py::arg("s_d"), py::arg("pair_token"), py::arg("pair_weight"), py::arg("offsets"), py::arg("at_down"),
      py::arg("bias_down"), py::arg("y"),
      "y [T, H] += sum over pairs of weight * (A_down[e] s_d + bias_down[e]).");
  m.def(
      "overlay_gate_up_portable",
      [](const py::array& gu0, const py::array& s_gu, const py::array& pair_token, const py::array& pair_weight,
         const py::array& offsets, const py::array& at_gate, const py::array& at_up, const py::object& bias_gate,
         const py::object& bias_up, int activation, float alpha, float limit, py::array h, py::array hw,
         const py::array& slot_pair, const py::array& slot_expert, int64_t top_k) {
        const OverlayGateUpArgs a = gate_up_args(gu0, s_gu, pair_token, pair_weight, offsets, at_gate, at_up,
                                                 bias_gate, bias_up, activation, alpha, limit, h, hw);
        if (top_k <= 0 || a.pairs != a.tokens * top_k) throw py::value_error("pairs must equal tokens * top_k");
        check_slots(slot_pair, slot_expert, a.tokens, top_k, a.pairs, a.experts);
        py::gil_scoped_release release;
        detail::overlay_gate_up_portable_cpu(a, ptr<int64_t>(slot_pair), ptr<int64_t>(slot_expert), top_k);
      },
      "As overlay_gate_up through the host/device arithmetic the CUDA kernel runs (per token and column).");
  m.def(
      "overlay_down_portable",
      [](const py::array& s_d, const py::array& pair_token, const py::array& pair_weight, const py::array& offsets,
         const py::array& at_down, const py::object& bias_down, py::array y, const py::array& slot_pair,
         const py::array& slot_expert, int64_t top_k) {
        const OverlayDownArgs a = down_args(s_d, pair_token, pair_weight, offsets, at_down, bias_down, y);
        if (top_k <= 0 || a.pairs != a.tokens * top_k) throw py::value_error("pairs must equal tokens * top_k");
        check_slots(slot_pair, slot_expert, a.tokens, top_k, a.pairs, a.experts);
        py::gil_scoped_release release;
        detail::overlay_down_portable_cpu(a, ptr<int64_t>(slot_pair), ptr<int64_t>(slot_expert), top_k);
      },
      "As overlay_down through the host/device arithmetic the CUDA kernel runs.");
}

}  // namespace bindings
}  // namespace lazarus
