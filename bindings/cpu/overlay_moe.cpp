// Why: binds the CPU overlay kernels (fused expand + activation + weighted reduction, the stored-weight
// matrix-vector products), checking every shape, dtype and index range so a raw pointer never reads outside
// its buffer. Weights travel in their stored dtype with a format code (Storage: 0 fp32, 1 bf16, 2 fp16,
// 3 MXFP4); 16-bit values as int16/uint16 arrays of their bits (numpy has no bfloat16).
#include "overlay_moe/overlay_moe.h"

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "buffer_checks.h"
#include "common/cpu_kernels.h"
#include "common/shared_runs.h"

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

Storage storage_format(int format) {
  if (format < 0 || format > 3) throw py::value_error("format must be 0 (fp32), 1 (bf16), 2 (fp16) or 3 (mxfp4)");
  return static_cast<Storage>(format);
}

// Raises unless `a` holds n values of the dense format `f` (fp32, or 16-bit bits for bf16/fp16), C-contiguous.
void check_stored(const py::array& a, const char* name, int64_t n, Storage f) {
  if (f == Storage::kF32) return check_array<float>(a, name, n, "float32");
  if (f == Storage::kMXFP4) throw py::value_error(std::string(name) + " must be a dense format, not MXFP4");
  if (a.itemsize() != 2 || a.dtype().kind() == 'f') {
    throw py::type_error(std::string(name) + " must hold 16-bit bits (int16/uint16), got " +
                         std::string(py::str(a.dtype())));
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (a.size() != n) {
    throw py::value_error(std::string(name) + " has " + std::to_string(a.size()) + " elements, expected " +
                          std::to_string(n));
  }
}

template <typename F>
const F* optional_stored(const py::object& t, const char* name, int64_t n, Storage f) {
  if (t.is_none()) return nullptr;
  py::array a = t.cast<py::array>();
  check_stored(a, name, n, f);
  return static_cast<const F*>(a.data());
}

// Checks that every index of `idx` (int64, n values) lies in [0, bound).
void check_indices(const py::array& idx, const char* name, int64_t n, int64_t bound) {
  check_array<int64_t>(idx, name, n, "int64");
  const int64_t* v = ptr<int64_t>(idx);
  for (int64_t i = 0; i < n; ++i)
    if (v[i] < 0 || v[i] >= bound) throw py::value_error(std::string(name) + " holds an index out of range");
}

// offsets [E+1] int64, non-decreasing from 0 to P; raises ValueError.
void check_offsets(const py::array& offsets, int64_t E, int64_t P) {
  check_array<int64_t>(offsets, "offsets", E + 1, "int64");
  const int64_t* o = ptr<int64_t>(offsets);
  if (o[0] != 0 || o[E] != P) throw py::value_error("offsets must start at 0 and end at the number of pairs");
  for (int64_t e = 0; e < E; ++e)
    if (o[e + 1] < o[e]) throw py::value_error("offsets must be non-decreasing");
}

// offsets as above; pair_token [P] in [0, T); pair_weight [P] float32.
void check_routing(const py::array& offsets, const py::array& pair_token, const py::array& pair_weight, int64_t E,
                   int64_t P, int64_t T) {
  check_offsets(offsets, E, P);
  check_array<float>(pair_weight, "pair_weight", P, "float32");
  check_indices(pair_token, "pair_token", P, T);
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

template <typename F>
OverlayGateUpArgsT<F> gate_up_args(const py::array& gu0, const py::array& s_gu, const py::array& pair_token,
                                   const py::array& pair_weight, const py::array& offsets, const py::array& at_gate,
                                   const py::array& at_up, const py::object& bias_gate, const py::object& bias_up,
                                   int activation, float alpha, float limit, py::array& h, py::array& hw, Storage f) {
  const int64_t E = dim(at_gate, "at_gate", 3, 0), rg = at_gate.shape(1), I = at_gate.shape(2);
  const int64_t ru = dim(at_up, "at_up", 3, 1);
  const int64_t T = dim(gu0, "gu0", 2, 0), P = dim(s_gu, "s_gu", 2, 0);
  if (activation != 0 && activation != 1) throw py::value_error("activation must be 0 (swiglu) or 1 (gpt_oss)");
  check_array<float>(gu0, "gu0", T * 2 * I, "float32");
  check_array<float>(s_gu, "s_gu", P * (rg + ru), "float32");
  check_stored(at_gate, "at_gate", E * rg * I, f);
  check_stored(at_up, "at_up", E * ru * I, f);
  check_array<float>(h, "h", P * I, "float32");
  check_array<float>(hw, "hw", T * I, "float32");
  check_writeable(h, "h");
  check_writeable(hw, "hw");
  check_routing(offsets, pair_token, pair_weight, E, P, T);
  return OverlayGateUpArgsT<F>{ptr<float>(gu0), ptr<float>(s_gu), ptr<int64_t>(pair_token), ptr<float>(pair_weight),
                               ptr<int64_t>(offsets), ptr<F>(at_gate), ptr<F>(at_up),
                               optional_stored<F>(bias_gate, "bias_gate", E * I, f),
                               optional_stored<F>(bias_up, "bias_up", E * I, f), T, I, P, E, rg, ru, activation, alpha,
                               limit, static_cast<float*>(h.mutable_data()), static_cast<float*>(hw.mutable_data())};
}

template <typename F>
OverlayDownArgsT<F> down_args(const py::array& s_d, const py::array& pair_token, const py::array& pair_weight,
                              const py::array& offsets, const py::array& at_down, const py::object& bias_down,
                              py::array& y, Storage f) {
  const int64_t E = dim(at_down, "at_down", 3, 0), rd = at_down.shape(1), H = at_down.shape(2);
  const int64_t T = dim(y, "y", 2, 0), P = dim(s_d, "s_d", 2, 0);
  check_array<float>(s_d, "s_d", P * rd, "float32");
  check_stored(at_down, "at_down", E * rd * H, f);
  check_array<float>(y, "y", T * H, "float32");
  check_writeable(y, "y");
  check_routing(offsets, pair_token, pair_weight, E, P, T);
  return OverlayDownArgsT<F>{ptr<float>(s_d), ptr<int64_t>(pair_token), ptr<float>(pair_weight), ptr<int64_t>(offsets),
                             ptr<F>(at_down), optional_stored<F>(bias_down, "bias_down", E * H, f), T, H, P, E, rd,
                             static_cast<float*>(y.mutable_data())};
}

// Calls fn.template operator()<F>() with F the element type of the dense format f.
template <typename Fn>
void with_factor_type(Storage f, Fn&& fn) {
  switch (f) {
    case Storage::kF32: return fn(float{});
    case Storage::kBF16: return fn(bf16_t{});
    case Storage::kF16: return fn(f16_t{});
    default: throw py::value_error("factor_format must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  }
}

// A stored weight [rows, cols]: dense `data` of `format`, or MXFP4 blocks `data` + `scales`.
StoredMatrix stored_matrix(const py::array& data, const py::object& scales, int format, int64_t rows, int64_t cols) {
  const Storage f = storage_format(format);
  if (rows < 0 || cols < 0) throw py::value_error("rows and cols must be non-negative");
  if (f != Storage::kMXFP4) {
    check_stored(data, "weight", rows * cols, f);
    return StoredMatrix{f, data.data(), nullptr, rows, cols};
  }
  if (cols % 32) throw py::value_error("an MXFP4 weight needs cols % 32 == 0, got " + std::to_string(cols));
  if (scales.is_none()) throw py::value_error("an MXFP4 weight needs scales");
  py::array s = scales.cast<py::array>();
  check_array<uint8_t>(data, "blocks", rows * cols / 2, "uint8");
  check_array<uint8_t>(s, "scales", rows * cols / 32, "uint8");
  return StoredMatrix{f, data.data(), ptr<uint8_t>(s), rows, cols};
}

// The checked problems of stored_matvec / overlay_shrink (their Python arguments, in order). A matvec with
// cols == 0 writes its zeros here and comes back empty.
MatvecProblem matvec_problem(const py::array& data, const py::object& scales, int format, int64_t rows, int64_t cols,
                             const py::array& x, const py::object& x_rows, py::array& y, int tokens) {
  if (tokens != kTokensFp32 && tokens != kTokensFixed16 && tokens != kTokensInt8)
    throw py::value_error("tokens must be 0 (fp32), 1 (fixed16) or 2 (int8), got " + std::to_string(tokens));
  const StoredMatrix w = stored_matrix(data, scales, format, rows, cols);
  check_array<float>(x, "x", -1, "float32");
  if (cols == 0 ? x.size() != 0 : x.size() % cols) throw py::value_error("x must have rows of cols values");
  const int64_t x_count = cols ? x.size() / cols : 0;
  const int64_t* idx = nullptr;
  int64_t n = x_count;
  if (!x_rows.is_none()) {
    py::array r = x_rows.cast<py::array>();
    n = r.size();
    check_indices(r, "x_rows", n, x_count);
    idx = ptr<int64_t>(r);
  }
  check_array<float>(y, "y", n * rows, "float32");
  check_writeable(y, "y");
  float* out = static_cast<float*>(y.mutable_data());
  if (cols == 0) {
    std::fill_n(out, n * rows, 0.0f);
    return MatvecProblem{};
  }
  return MatvecProblem{w, ptr<float>(x), idx, n, out, rows, tokens};
}

ShrinkProblem shrink_problem(const py::array& b, int factor_format, int64_t experts, int64_t rank, int64_t cols,
                             const py::array& offsets, int64_t max_pairs, const py::array& inp,
                             const py::object& rows, py::array& s) {
  const StoredMatrix w = stored_matrix(b, py::none(), factor_format, experts * rank, cols);
  if (w.format == Storage::kMXFP4) throw py::value_error("overlay_shrink: factors must be a dense format");
  const int64_t P = dim(s, "s", 2, 0);
  if (s.shape(1) != rank) throw py::value_error("s must be [P, rank]");
  check_array<float>(s, "s", P * rank, "float32");
  check_writeable(s, "s");
  check_offsets(offsets, experts, P);
  check_array<float>(inp, "inp", -1, "float32");
  if (cols == 0 || inp.size() % cols) throw py::value_error("inp must have rows of cols > 0 values");
  const int64_t* idx = nullptr;
  if (!rows.is_none()) {
    py::array r = rows.cast<py::array>();
    check_indices(r, "rows", P, inp.size() / cols);
    idx = ptr<int64_t>(r);
  } else if (inp.size() / cols < P) {
    throw py::value_error("inp has fewer rows than pairs");
  }
  return ShrinkProblem{w, rank, ptr<int64_t>(offsets), experts, max_pairs, ptr<float>(inp), idx,
                       static_cast<float*>(s.mutable_data())};
}

// The weights of overlay_moe_small, checked once: a layer calls the one-call forward at every decode step, and
// re-checking its 15 arrays each time (with its Python-side views) costs more than the arithmetic of small
// layers. `keep` holds the arrays, so the pointers stay valid while the object lives.
struct SmallLayer {
  py::tuple keep;
  Storage factors = Storage::kF32;
  StoredMatrix base_gate_up{}, base_down{}, b_gate_up{}, b_down{};
  const void* at_gate = nullptr;
  const void* at_up = nullptr;
  const void* at_down = nullptr;
  const void* bias_gate = nullptr;
  const void* bias_up = nullptr;
  const void* bias_down = nullptr;
  int64_t experts = 0, hidden = 0, inter = 0, rank_gate = 0, rank_up = 0, rank_down = 0;
};

SmallLayer small_layer(const py::array& gate_up_data, const py::object& gate_up_scales, const py::array& down_data,
                       const py::object& down_scales, int base_format, const py::array& b_gate_up,
                       const py::array& b_down, const py::array& at_gate, const py::array& at_up,
                       const py::array& at_down, const py::object& bias_gate, const py::object& bias_up,
                       const py::object& bias_down, int factor_format) {
  SmallLayer L;
  const Storage f = storage_format(factor_format);
  if (f == Storage::kMXFP4) throw py::value_error("factor_format must be a dense format");
  const int64_t E = dim(at_gate, "at_gate", 3, 0), rg = at_gate.shape(1), I = at_gate.shape(2);
  const int64_t ru = dim(at_up, "at_up", 3, 1), rd = dim(at_down, "at_down", 3, 1), H = dim(at_down, "at_down", 3, 2);
  L.base_gate_up = stored_matrix(gate_up_data, gate_up_scales, base_format, 2 * I, H);
  L.base_down = stored_matrix(down_data, down_scales, base_format, H, I);
  L.b_gate_up = stored_matrix(b_gate_up, py::none(), factor_format, E * (rg + ru), H);
  L.b_down = stored_matrix(b_down, py::none(), factor_format, E * rd, I);
  check_stored(at_gate, "at_gate", E * rg * I, f);
  check_stored(at_up, "at_up", E * ru * I, f);
  check_stored(at_down, "at_down", E * rd * H, f);
  L.factors = f;
  L.at_gate = at_gate.data();
  L.at_up = at_up.data();
  L.at_down = at_down.data();
  L.bias_gate = optional_stored<void>(bias_gate, "bias_gate", E * I, f);
  L.bias_up = optional_stored<void>(bias_up, "bias_up", E * I, f);
  L.bias_down = optional_stored<void>(bias_down, "bias_down", E * H, f);
  L.experts = E, L.hidden = H, L.inter = I, L.rank_gate = rg, L.rank_up = ru, L.rank_down = rd;
  L.keep = py::make_tuple(gate_up_data, gate_up_scales, down_data, down_scales, b_gate_up, b_down, at_gate, at_up,
                          at_down, bias_gate, bias_up, bias_down);
  return L;
}

// The one-call forward of T tokens through a checked layer; x [T, H] and topk_weights [T, K] fp32, topk_ids
// [T, K] int64 (each id checked here), y [T, H] written.
void run_small(const SmallLayer& L, const float* x, const int64_t* topk_ids, const float* topk_weights, int64_t T,
               int64_t K, int activation, float alpha, float limit, int tokens, float* y) {
  if (tokens != kTokensFp32 && tokens != kTokensFixed16 && tokens != kTokensInt8)
    throw py::value_error("tokens must be 0 (fp32), 1 (fixed16) or 2 (int8), got " + std::to_string(tokens));
  if (activation != 0 && activation != 1) throw py::value_error("activation must be 0 (swiglu) or 1 (gpt_oss)");
  if (T < 0 || K < 1) throw py::value_error("topk_ids must be [T, K >= 1] with T = x rows");
  for (int64_t i = 0; i < T * K; ++i)
    if (topk_ids[i] < 0 || topk_ids[i] >= L.experts) throw py::value_error("topk_ids holds an index out of range");
  with_factor_type(L.factors, [&](auto tag) {
    using F = decltype(tag);
    const auto f = [](const void* p) { return static_cast<const F*>(p); };
    const SmallForwardT<F> a{x, topk_ids, topk_weights, T, K, L.base_gate_up, L.base_down, L.b_gate_up, L.b_down,
                             f(L.at_gate), f(L.at_up), f(L.at_down), f(L.bias_gate), f(L.bias_up), f(L.bias_down),
                             L.experts, L.hidden, L.inter, L.rank_gate, L.rank_up, L.rank_down, activation, alpha,
                             limit, tokens, y};
    py::gil_scoped_release release;
    overlay_moe_small_cpu(a);
  });
}

}  // namespace

void bind_overlay_moe(py::module_& m) {
  m.def(
      "overlay_gate_up",
      [](const py::array& gu0, const py::array& s_gu, const py::array& pair_token, const py::array& pair_weight,
         const py::array& offsets, const py::array& at_gate, const py::array& at_up, const py::object& bias_gate,
         const py::object& bias_up, int activation, float alpha, float limit, py::array h, py::array hw,
         int factor_format) {
        with_factor_type(storage_format(factor_format), [&](auto tag) {
          using F = decltype(tag);
          const auto a = gate_up_args<F>(gu0, s_gu, pair_token, pair_weight, offsets, at_gate, at_up, bias_gate,
                                         bias_up, activation, alpha, limit, h, hw, storage_format(factor_format));
          py::gil_scoped_release release;
          overlay_gate_up_cpu(a);
        });
      },
      py::arg("gu0"), py::arg("s_gu"), py::arg("pair_token"), py::arg("pair_weight"), py::arg("offsets"),
      py::arg("at_gate"), py::arg("at_up"), py::arg("bias_gate"), py::arg("bias_up"), py::arg("activation"),
      py::arg("alpha"), py::arg("limit"), py::arg("h"), py::arg("hw"), py::arg("factor_format") = 0,
      "h [P, I] = act(gu0[token] + bias + A^T-expand of s_gu) per expert-sorted pair; hw [T, I] = weighted sum. "
      "Factors and biases in factor_format (0 fp32, 1 bf16 bits, 2 fp16 bits).");
  m.def(
      "overlay_down",
      [](const py::array& s_d, const py::array& pair_token, const py::array& pair_weight, const py::array& offsets,
         const py::array& at_down, const py::object& bias_down, py::array y, int factor_format) {
        with_factor_type(storage_format(factor_format), [&](auto tag) {
          using F = decltype(tag);
          const auto a = down_args<F>(s_d, pair_token, pair_weight, offsets, at_down, bias_down, y,
                                      storage_format(factor_format));
          py::gil_scoped_release release;
          overlay_down_cpu(a);
        });
      },
      py::arg("s_d"), py::arg("pair_token"), py::arg("pair_weight"), py::arg("offsets"), py::arg("at_down"),
      py::arg("bias_down"), py::arg("y"), py::arg("factor_format") = 0,
      "y [T, H] += sum over pairs of weight * (A_down[e] s_d + bias_down[e]).");
  m.def(
      "mxfp4_gemm",
      [](const py::array& blocks, const py::array& scales, int64_t rows, int64_t cols, const py::array& x, py::array y,
         int tokens) {
        if (cols % 32) throw py::value_error("mxfp4_gemm: cols must be a multiple of 32, got " + std::to_string(cols));
        const MatvecProblem p = matvec_problem(blocks, scales, 3, rows, cols, x, py::none(), y, tokens);
        if (p.w.data == nullptr) return true;  // cols == 0: zeros written
        py::gil_scoped_release release;
        return mxfp4_gemm_q8_cpu(p.w, p.x, p.n, p.y, p.ldy, p.token_mode);
      },
      py::arg("blocks"), py::arg("scales"), py::arg("rows"), py::arg("cols"), py::arg("x"), py::arg("y"),
      py::arg("tokens"),
      "y [n, rows] = x @ W^T for an MXFP4 W (blocks uint8 [rows, cols/32, 16], scales [rows, cols/32]) and x "
      "float32 [n, cols] rounded per 32-block as tokens says (1 16-bit fixed point, 2 int8), in integers with "
      "AVX-512 VNNI or AVX2 (the same bits). Returns False, writing nothing, when it cannot (no AVX2, tokens 0, x not "
      "finite).");
  m.def(
      "stored_matvec",
      [](const py::array& data, const py::object& scales, int format, int64_t rows, int64_t cols, const py::array& x,
         const py::object& x_rows, py::array y, int tokens) {
        const MatvecProblem p = matvec_problem(data, scales, format, rows, cols, x, x_rows, y, tokens);
        py::gil_scoped_release release;
        stored_matvec_and_shrink_cpu(p, ShrinkProblem{});
      },
      py::arg("data"), py::arg("scales"), py::arg("format"), py::arg("rows"), py::arg("cols"), py::arg("x"),
      py::arg("x_rows"), py::arg("y"), py::arg("tokens") = 0,
      "y [n, rows] = x[x_rows] @ W^T for a stored W [rows, cols] (format 0 fp32, 1 bf16, 2 fp16, 3 MXFP4 with "
      "scales), decoded in registers; x float32 [*, cols]. tokens: how MXFP4 meets x (0 fp32, 1 16-bit fixed point "
      "per 32-block, 2 int8 per 32-block).");
  m.def(
      "overlay_shrink",
      [](const py::array& b, int factor_format, int64_t experts, int64_t rank, int64_t cols, const py::array& offsets,
         int64_t max_pairs, const py::array& inp, const py::object& rows, py::array s) {
        const ShrinkProblem p = shrink_problem(b, factor_format, experts, rank, cols, offsets, max_pairs, inp, rows, s);
        py::gil_scoped_release release;
        stored_matvec_and_shrink_cpu(MatvecProblem{}, p);
      },
      py::arg("b"), py::arg("factor_format"), py::arg("experts"), py::arg("rank"), py::arg("cols"), py::arg("offsets"),
      py::arg("max_pairs"), py::arg("inp"), py::arg("rows"), py::arg("s"),
      "s[p] = B[e(p)] @ inp[rows[p]] for expert-sorted pairs of experts with at most max_pairs pairs (the others "
      "are left untouched); B [experts, rank, cols] stored in factor_format.");
  m.def(
      "stored_matvec_and_shrink",
      [](const py::array& data, const py::object& scales, int format, int64_t rows, int64_t cols, const py::array& x,
         const py::object& x_rows, py::array y, const py::array& b, int factor_format, int64_t experts, int64_t rank,
         int64_t b_cols, const py::array& offsets, int64_t max_pairs, const py::array& inp, const py::object& inp_rows,
         py::array s, int tokens) {
        const MatvecProblem base = matvec_problem(data, scales, format, rows, cols, x, x_rows, y, tokens);
        const ShrinkProblem shrink =
            shrink_problem(b, factor_format, experts, rank, b_cols, offsets, max_pairs, inp, inp_rows, s);
        py::gil_scoped_release release;
        stored_matvec_and_shrink_cpu(base, shrink);
      },
      py::arg("data"), py::arg("scales"), py::arg("format"), py::arg("rows"), py::arg("cols"), py::arg("x"),
      py::arg("x_rows"), py::arg("y"), py::arg("b"), py::arg("factor_format"), py::arg("experts"), py::arg("rank"),
      py::arg("b_cols"), py::arg("offsets"), py::arg("max_pairs"), py::arg("inp"), py::arg("inp_rows"), py::arg("s"),
      py::arg("tokens") = 0,
      "stored_matvec (data .. y) and overlay_shrink (b .. s, b_cols = its cols) in one parallel region.");
  m.def(
      "overlay_moe_small",
      [](const py::array& x, const py::array& topk_ids, const py::array& topk_weights, const py::array& gate_up_data,
         const py::object& gate_up_scales, const py::array& down_data, const py::object& down_scales, int base_format,
         const py::array& b_gate_up, const py::array& b_down, const py::array& at_gate, const py::array& at_up,
         const py::array& at_down, const py::object& bias_gate, const py::object& bias_up,
         const py::object& bias_down, int factor_format, int activation, float alpha, float limit, int tokens,
         py::array y) {
        const SmallLayer L = small_layer(gate_up_data, gate_up_scales, down_data, down_scales, base_format, b_gate_up,
                                         b_down, at_gate, at_up, at_down, bias_gate, bias_up, bias_down, factor_format);
        const int64_t T = dim(x, "x", 2, 0), K = dim(topk_ids, "topk_ids", 2, 1);
        if (x.shape(1) != L.hidden) throw py::value_error("x must be [T, H] with H = the layer's hidden size");
        if (K < 1 || topk_ids.shape(0) != T) throw py::value_error("topk_ids must be [T, K >= 1] with T = x rows");
        check_array<float>(x, "x", T * L.hidden, "float32");
        check_indices(topk_ids, "topk_ids", T * K, L.experts);
        check_array<float>(topk_weights, "topk_weights", T * K, "float32");
        check_array<float>(y, "y", T * L.hidden, "float32");
        check_writeable(y, "y");
        run_small(L, ptr<float>(x), ptr<int64_t>(topk_ids), ptr<float>(topk_weights), T, K, activation, alpha, limit,
                  tokens, static_cast<float*>(y.mutable_data()));
      },
      py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("gate_up_data"), py::arg("gate_up_scales"),
      py::arg("down_data"), py::arg("down_scales"), py::arg("base_format"), py::arg("b_gate_up"), py::arg("b_down"),
      py::arg("at_gate"), py::arg("at_up"), py::arg("at_down"), py::arg("bias_gate"), py::arg("bias_up"),
      py::arg("bias_down"), py::arg("factor_format"), py::arg("activation"), py::arg("alpha"), py::arg("limit"),
      py::arg("tokens"), py::arg("y"),
      "The whole overlay MoE forward of a small batch in one parallel region: x [T, H], topk_ids [T, K] int64, "
      "topk_weights [T, K] fp32, bases as stored (base_format), factors and biases in factor_format; y [T, H].");
  py::class_<SmallLayer>(m, "SmallLayer",
                         "A layer's weights for the one-call small-batch forward, checked once (as overlay_moe_small "
                         "checks them) and kept alive; forward() runs the layer.")
      .def(py::init(&small_layer), py::arg("gate_up_data"), py::arg("gate_up_scales"), py::arg("down_data"),
           py::arg("down_scales"), py::arg("base_format"), py::arg("b_gate_up"), py::arg("b_down"), py::arg("at_gate"),
           py::arg("at_up"), py::arg("at_down"), py::arg("bias_gate"), py::arg("bias_up"), py::arg("bias_down"),
           py::arg("factor_format"))
      .def_readonly("hidden", &SmallLayer::hidden)
      .def_readonly("experts", &SmallLayer::experts)
      .def(
          "forward",
          [](const SmallLayer& L, uintptr_t x, uintptr_t topk_ids, uintptr_t topk_weights, int64_t T, int64_t K,
             int activation, float alpha, float limit, int tokens, uintptr_t y) {
            if (!x || !topk_ids || !topk_weights || !y) throw py::value_error("forward: a null data pointer");
            run_small(L, reinterpret_cast<const float*>(x), reinterpret_cast<const int64_t*>(topk_ids),
                      reinterpret_cast<const float*>(topk_weights), T, K, activation, alpha, limit, tokens,
                      reinterpret_cast<float*>(y));
          },
          py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("tokens_T"), py::arg("top_k"),
          py::arg("activation"), py::arg("alpha"), py::arg("limit"), py::arg("tokens"), py::arg("y"),
          "overlay_moe_small on data pointers (Tensor.data_ptr()): x [T, hidden] and topk_weights [T, K] float32, "
          "topk_ids [T, K] int64 (each id checked here), y [T, hidden] float32, all C-contiguous on the CPU. The "
          "caller guarantees dtypes, shapes and contiguity (overlay_moe_forward checks them): a data pointer "
          "carries none, which is why it is not what a user calls; it skips the numpy views, which cost 15-20 us "
          "each at T=1 with the interpreter's state just evicted by the weights.");
  m.def(
      "overlay_gate_up_portable",
      [](const py::array& gu0, const py::array& s_gu, const py::array& pair_token, const py::array& pair_weight,
         const py::array& offsets, const py::array& at_gate, const py::array& at_up, const py::object& bias_gate,
         const py::object& bias_up, int activation, float alpha, float limit, py::array h, py::array hw,
         const py::array& slot_pair, const py::array& slot_expert, int64_t top_k) {
        const OverlayGateUpArgs a = gate_up_args<float>(gu0, s_gu, pair_token, pair_weight, offsets, at_gate, at_up,
                                                        bias_gate, bias_up, activation, alpha, limit, h, hw,
                                                        Storage::kF32);
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
        const OverlayDownArgs a = down_args<float>(s_d, pair_token, pair_weight, offsets, at_down, bias_down, y,
                                                   Storage::kF32);
        if (top_k <= 0 || a.pairs != a.tokens * top_k) throw py::value_error("pairs must equal tokens * top_k");
        check_slots(slot_pair, slot_expert, a.tokens, top_k, a.pairs, a.experts);
        py::gil_scoped_release release;
        detail::overlay_down_portable_cpu(a, ptr<int64_t>(slot_pair), ptr<int64_t>(slot_expert), top_k);
      },
      "As overlay_down through the host/device arithmetic the CUDA kernel runs.");
  m.def(
      "shared_runs_fronts",
      [](int64_t n, int runs) {
        SharedRuns queue(n, runs);
        const auto fronts = [&] {
          py::list f;
          for (int r = -1; r <= runs; ++r) f.append(queue.front(r));  // r = -1 and r = runs: out of range
          return f;
        };
        py::list seen;
        seen.append(fronts());
        queue.for_each([&](int64_t it) { seen.append(py::make_tuple(it, fronts())); });
        return seen;
      },
      py::arg("n"), py::arg("runs"),
      "SharedRuns(n, runs).front(r) for r in -1..runs before a one-thread for_each, then (item, the same) at each "
      "item it hands out, for tests (call outside a parallel region).");
  m.def(
      "shared_runs_visits",
      [](int64_t n, int runs, int threads) {
        if (threads < 1) throw py::value_error("threads must be >= 1");
        SharedRuns queue(n, runs);
        std::vector<std::atomic<int>> visits(static_cast<size_t>(n));
        std::vector<int> thread(static_cast<size_t>(n), -1), order(static_cast<size_t>(n), -1);
        std::atomic<int> next{0};
        {
          py::gil_scoped_release release;
          LZ_OMP(parallel num_threads(threads))
          queue.for_each([&](int64_t it) {
            visits[it].fetch_add(1);
#if defined(LAZARUS_WITH_OPENMP)
            thread[it] = omp_get_thread_num();
#else
            thread[it] = 0;
#endif
            order[it] = next.fetch_add(1);
          });
        }
        py::list count, by, when;
        for (int64_t i = 0; i < n; ++i) {
          count.append(visits[i].load());
          by.append(thread[i]);
          when.append(order[i]);
        }
        return py::make_tuple(count, by, when);
      },
      py::arg("n"), py::arg("runs"), py::arg("threads"),
      "SharedRuns over n items in `runs` runs, shared by `threads` threads (the one-call forward's schedule): per "
      "item the times it ran, the thread that ran it and its position in the global order. For tests.");
}

}  // namespace bindings
}  // namespace lazarus
