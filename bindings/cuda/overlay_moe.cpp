// Why: binds the CUDA overlay launchers (tiles of expert-sorted pairs, factors in storage dtype); the Python
// op (lazarus_core/ops/overlay_moe_gpu.py) builds the tile map and checks shapes, dtypes and devices of the
// tensors before their pointers arrive here. Also binds the launch-geometry function, which runs on the host
// (the CPU tests check it for token counts above the old 65,535 limit).
#include "overlay_moe/overlay_moe_gpu.h"

#include <string>

#include "buffer_checks.h"

namespace lazarus {
namespace bindings {

void raise_on_cuda_error(int code, const char* what);

namespace {
template <typename T>
T* p(uintptr_t v) { return reinterpret_cast<T*>(v); }

OverlayTiles tiles_of(uintptr_t tile_expert, uintptr_t tile_row, uintptr_t offsets, int64_t n_tiles, int block_m,
                      const char* op) {
  if (n_tiles < 0 || block_m < 1 || block_m > kMaxTileRows)
    throw py::value_error(std::string(op) + ": n_tiles must be >= 0 and block_m in [1, " +
                          std::to_string(kMaxTileRows) + "], got " + std::to_string(n_tiles) + ", " +
                          std::to_string(block_m));
  for (auto [v, name] : {std::pair{tile_expert, "tile_expert"}, {tile_row, "tile_row"}, {offsets, "offsets"}})
    check_device_pointer(v, name, n_tiles);
  return OverlayTiles{p<const int32_t>(tile_expert), p<const int64_t>(tile_row), p<const int64_t>(offsets), n_tiles,
                      block_m};
}

Storage storage_of(int code, const char* op) {
  if (code < 0 || code > 2)
    throw py::value_error(std::string(op) + ": factor dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16), got " +
                          std::to_string(code));
  return static_cast<Storage>(code);
}
}  // namespace

void bind_overlay_moe(py::module_& m) {
  // Each launcher is bound twice: NAME takes device pointers and a stream; NAME_host runs the host twin of the
  // same kernel bodies on host pointers (the stream is ignored), for the CPU tests.
  for (const bool host : {false, true}) {
  const std::string sfx = host ? "_host" : "";
  m.def(
      ("overlay_grouped_shrink" + sfx).c_str(),
      [host](uintptr_t inp, uintptr_t rows, uintptr_t tile_expert, uintptr_t tile_row, uintptr_t offsets, int64_t n_tiles,
         int block_m, uintptr_t b, int b_dtype, uintptr_t out, int64_t pairs, int64_t in_dim, int64_t rank,
         int64_t split, int64_t k_chunk, uintptr_t stream) {
        if (pairs < 0 || in_dim < 0 || rank < 0) throw py::value_error("overlay_grouped_shrink: negative size");
        const OverlayTiles t = tiles_of(tile_expert, tile_row, offsets, n_tiles, block_m, "overlay_grouped_shrink");
        const Storage dt = storage_of(b_dtype, "overlay_grouped_shrink");
        if (split < 1 || split > kMaxGridYZ || k_chunk < 1 || split * k_chunk < in_dim)
          throw py::value_error("overlay_grouped_shrink: split * k_chunk must cover in_dim (split in [1, 65535])");
        const OverlaySplit sk{split, k_chunk};
        for (auto [v, name] : {std::pair{inp, "inp"}, {rows, "rows"}, {b, "b"}, {out, "out"}})
          check_device_pointer(v, name, pairs * rank);
        int code;
        {
          py::gil_scoped_release release;
          code = host ? detail::overlay_grouped_shrink_host(p<const float>(inp), p<const int64_t>(rows), t,
                                                            p<const void>(b), dt, p<float>(out), pairs, in_dim, rank,
                                                            sk)
                      : overlay_grouped_shrink_cuda(p<const float>(inp), p<const int64_t>(rows), t, p<const void>(b),
                                                    dt, p<float>(out), pairs, in_dim, rank, sk,
                                                    reinterpret_cast<void*>(stream));
        }
        raise_on_cuda_error(code, "overlay_grouped_shrink");
      });
  m.def(
      ("overlay_gate_up_expand" + sfx).c_str(),
      [host](uintptr_t gu0, uintptr_t s_gu, uintptr_t slot, uintptr_t tile_expert, uintptr_t tile_row, uintptr_t offsets,
         int64_t n_tiles, int block_m, uintptr_t at_gate, uintptr_t at_up, uintptr_t bias_gate, uintptr_t bias_up,
         int dtype, int activation, float alpha, float limit, uintptr_t h, int64_t pairs, int64_t inter,
         int64_t rank_gate, int64_t rank_up, int64_t top_k, uintptr_t stream) {
        if (pairs < 0 || inter < 0 || rank_gate < 0 || rank_up < 0 || top_k <= 0)
          throw py::value_error("overlay_gate_up_expand: sizes must be non-negative (top_k positive)");
        const OverlayTiles t = tiles_of(tile_expert, tile_row, offsets, n_tiles, block_m, "overlay_gate_up_expand");
        const Storage dt = storage_of(dtype, "overlay_gate_up_expand");
        for (auto [v, name] : {std::pair{gu0, "gu0"}, {slot, "slot"}, {h, "h"}}) check_device_pointer(v, name, pairs * inter);
        const OverlayExpandArgs a{p<const float>(s_gu), p<const int64_t>(slot), p<const void>(at_gate),
                                  p<const void>(at_up), p<const void>(bias_gate), p<const void>(bias_up), dt, pairs,
                                  inter, rank_gate, rank_up, top_k, activation, alpha, limit, p<const float>(gu0),
                                  nullptr, p<float>(h)};
        int code;
        {
          py::gil_scoped_release release;
          code = host ? detail::overlay_gate_up_expand_host(a, t)
                      : overlay_gate_up_expand_cuda(a, t, reinterpret_cast<void*>(stream));
        }
        raise_on_cuda_error(code, "overlay_gate_up_expand");
      });
  m.def(
      ("overlay_down_expand" + sfx).c_str(),
      [host](uintptr_t s_d, uintptr_t slot, uintptr_t weight, uintptr_t tile_expert, uintptr_t tile_row, uintptr_t offsets,
         int64_t n_tiles, int block_m, uintptr_t at_down, uintptr_t bias_down, int dtype, uintptr_t corr, int64_t pairs,
         int64_t hidden, int64_t rank_down, uintptr_t stream) {
        if (pairs < 0 || hidden < 0 || rank_down < 0) throw py::value_error("overlay_down_expand: negative size");
        const OverlayTiles t = tiles_of(tile_expert, tile_row, offsets, n_tiles, block_m, "overlay_down_expand");
        const Storage dt = storage_of(dtype, "overlay_down_expand");
        for (auto [v, name] : {std::pair{slot, "slot"}, {weight, "weight"}, {corr, "corr"}})
          check_device_pointer(v, name, pairs * hidden);
        const OverlayExpandArgs a{p<const float>(s_d), p<const int64_t>(slot), p<const void>(at_down), nullptr,
                                  p<const void>(bias_down), nullptr, dt, pairs, hidden, rank_down, 0, 1, 0, 0.0f,
                                  0.0f, nullptr, p<const float>(weight), p<float>(corr)};
        int code;
        {
          py::gil_scoped_release release;
          code = host ? detail::overlay_down_expand_host(a, t)
                      : overlay_down_expand_cuda(a, t, reinterpret_cast<void*>(stream));
        }
        raise_on_cuda_error(code, "overlay_down_expand");
      });
  }
  m.def(
      "overlay_shrink_split",
      [](int64_t n_tiles, int64_t rank, int64_t in_dim, int64_t target_blocks) {
        if (n_tiles < 0 || rank < 0 || in_dim < 0 || target_blocks < 1)
          throw py::value_error("overlay_shrink_split: sizes must be non-negative (target_blocks positive)");
        const OverlaySplit sk = overlay_shrink_split(n_tiles, rank, in_dim, target_blocks);
        return py::make_tuple(sk.split, sk.k_chunk);
      },
      "(split, k_chunk) of the grouped shrink's split-K for about target_blocks blocks (host computation).");
  m.def(
      "overlay_launch_geometry",
      [](int64_t n_tiles, int64_t extent, int64_t per_block) {
        if (n_tiles < 0 || extent < 0 || per_block <= 0)
          throw py::value_error("overlay_launch_geometry: sizes must be non-negative (per_block positive)");
        const OverlayGrid g = overlay_grid(n_tiles, extent, per_block);
        return py::make_tuple(g.x, g.y, g.blocks);
      },
      "The (gridDim.x, gridDim.y, blocks per tile) an overlay kernel launches with (host computation).");
  m.attr("overlay_tile_rows") = kMaxTileRows;
  m.attr("overlay_threads") = kOverlayThreads;
  m.attr("overlay_shrink_warps") = kShrinkWarps;
}

}  // namespace bindings
}  // namespace lazarus
