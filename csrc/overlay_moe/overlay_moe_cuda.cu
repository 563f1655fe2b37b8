// Why: the overlay's low-rank stages on the GPU, on tiles of (token, expert) pairs of one expert
// (overlay_moe_gpu.h), reading the factors in their storage dtype.
// - grouped shrink: one warp per rank row j of B[e]; the warp streams that row once per tile (coalesced, in
//   storage dtype) and accumulates the dot with each of the tile's up-to-16 input rows in registers, then
//   reduces across lanes. No per-expert GEMM launches, no host sync. Split-K on gridDim.z for decode (few
//   tiles): each z covers one chunk of the input dimension and writes its own partials.
// - expand (gate_up, down): one thread per output column; the thread walks the rank, loading A^T[e, j, c]
//   once per tile (coalesced across the block) and multiplying it with s[q, j] of each of the tile's pairs
//   (a broadcast load), so a tile costs one pass over its expert's expand factors. The epilogue adds the
//   biases, applies the activation (gate_up) or the routing weight (down) and stores one row per pair slot.
// Tiles sit on gridDim.x and column blocks on gridDim.y, both walked with grid-stride loops (overlay_grid):
// any number of tokens launches (the previous kernels put tokens on gridDim.y and failed above 65,535).
#include <cuda_runtime.h>

#include "overlay_moe/overlay_moe_gpu.h"
#include "overlay_moe/overlay_moe_math.h"

namespace lazarus {
namespace {

// ---- per-(tile, row or column) bodies: run by the CUDA kernels and, over all indices, by the host twin ----

template <typename F>
LZ_HD float load(const void* p, int64_t i) {
  return to_float(static_cast<const F*>(p)[i]);
}

struct Tile {
  int64_t expert, row0, rows;
};

LZ_HD bool tile_of(const OverlayTiles& t, int64_t tile, Tile* out) {
  const int32_t e = t.tile_expert[tile];
  if (e < 0) return false;
  const int64_t row0 = t.tile_row[tile];
  const int64_t end = t.offsets[e + 1];
  out->expert = e;
  out->row0 = row0;
  out->rows = end - row0 < t.block_m ? end - row0 : t.block_m;
  return out->rows > 0;
}

// Lane `lane` of the warp that owns rank row j of the tile: acc[m] = sum over k = k_begin + lane, + 32, ...
// below k_end of B[e, j, k] * inp[rows[row0 + m], k] for the tile's rows (the lanes' partials are then
// tree-reduced).
template <typename F>
LZ_HD void shrink_lane(const float* inp, const int64_t* rows, const Tile& t, const void* b, int64_t in_dim,
                       int64_t rank, int64_t j, int64_t k_begin, int64_t k_end, int lane, float* acc) {
  const float* x[kMaxTileRows];
  for (int m = 0; m < kMaxTileRows; ++m) x[m] = inp + (m < t.rows ? rows[t.row0 + m] : 0) * in_dim;
  const int64_t brow = (t.expert * rank + j) * in_dim;
  for (int m = 0; m < kMaxTileRows; ++m) acc[m] = 0.0f;
  for (int64_t k = k_begin + lane; k < k_end; k += 32) {
    const float bv = load<F>(b, brow + k);
#pragma unroll
    for (int m = 0; m < kMaxTileRows; ++m)
      if (m < t.rows) acc[m] += bv * x[m][k];
  }
}

// acc[m] += sum_j s[(row0 + m) * s_stride + j] * at[(e * rank + j) * cols + c] for the tile's rows.
template <typename F>
LZ_HD void expand_tile(const float* s, int64_t s_stride, const void* at, const Tile& t, int64_t rank, int64_t cols,
                       int64_t c, float* acc) {
  for (int64_t j = 0; j < rank; ++j) {
    const float a = load<F>(at, (t.expert * rank + j) * cols + c);
#pragma unroll
    for (int m = 0; m < kMaxTileRows; ++m)
      if (m < t.rows) acc[m] += s[(t.row0 + m) * s_stride + j] * a;
  }
}

// Column c of every pair of the tile: expand, biases, activation, stored at the pair's slot.
template <typename F>
LZ_HD void gate_up_column(const OverlayExpandArgs& a, const Tile& t, int64_t c) {
  const int64_t I = a.cols, rg = a.rank0, ru = a.rank1;
  float g[kMaxTileRows] = {}, u[kMaxTileRows] = {};
  expand_tile<F>(a.s, rg + ru, a.at0, t, rg, I, c, g);
  expand_tile<F>(a.s + rg, rg + ru, a.at1, t, ru, I, c, u);
  const float bg = a.bias0 ? load<F>(a.bias0, t.expert * I + c) : 0.0f;
  const float bu = a.bias1 ? load<F>(a.bias1, t.expert * I + c) : 0.0f;
#pragma unroll
  for (int m = 0; m < kMaxTileRows; ++m) {
    if (m >= t.rows) continue;
    const int64_t slot = a.slot[t.row0 + m], tok = slot / a.top_k;
    const float gv = a.gu0[tok * 2 * I + c] + g[m] + bg;
    const float uv = a.gu0[tok * 2 * I + I + c] + u[m] + bu;
    a.out[slot * I + c] = overlay::activation(gv, uv, a.activation, a.alpha, a.limit);
  }
}

// Column c of every pair of the tile: w * (expand + bias), stored at the pair's slot.
template <typename F>
LZ_HD void down_column(const OverlayExpandArgs& a, const Tile& t, int64_t c) {
  const int64_t H = a.cols, rd = a.rank0;
  float v[kMaxTileRows] = {};
  expand_tile<F>(a.s, rd, a.at0, t, rd, H, c, v);
  const float bd = a.bias0 ? load<F>(a.bias0, t.expert * H + c) : 0.0f;
#pragma unroll
  for (int m = 0; m < kMaxTileRows; ++m) {
    if (m >= t.rows) continue;
    const int64_t slot = a.slot[t.row0 + m];
    a.out[slot * H + c] = a.weight[slot] * (v[m] + bd);
  }
}

// ---- CUDA kernels: tiles on gridDim.x, rank-row / column blocks on gridDim.y, both grid-stride ----

template <typename F>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    grouped_shrink_kernel(const float* __restrict__ inp, const int64_t* __restrict__ rows, OverlayTiles tiles,
                          const void* __restrict__ b, float* __restrict__ out, int64_t in_dim, int64_t rank,
                          int64_t pairs, OverlaySplit split, OverlayGrid grid) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t z = blockIdx.z; z < split.split; z += gridDim.z) {
    const int64_t k_begin = z * split.k_chunk;
    const int64_t k_end = k_begin + split.k_chunk < in_dim ? k_begin + split.k_chunk : in_dim;
    float* part = out + z * pairs * rank;
    for (int64_t tile = blockIdx.x; tile < tiles.n_tiles; tile += gridDim.x) {
      Tile t;
      if (!tile_of(tiles, tile, &t)) continue;
      for (int64_t rb = blockIdx.y; rb < grid.blocks; rb += gridDim.y) {
        const int64_t j = rb * kShrinkWarps + warp;
        if (j >= rank) continue;                      // whole warps skip together (j is per warp)
        float acc[kMaxTileRows];
        shrink_lane<F>(inp, rows, t, b, in_dim, rank, j, k_begin, k_end, lane, acc);
#pragma unroll
        for (int m = 0; m < kMaxTileRows; ++m) {
          float v = acc[m];
          for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
          if (lane == 0 && m < t.rows) part[(t.row0 + m) * rank + j] = v;
        }
      }
    }
  }
}

template <bool GATE_UP, typename F>
__global__ void __launch_bounds__(kOverlayThreads) expand_kernel(OverlayExpandArgs a, OverlayTiles tiles,
                                                                 OverlayGrid grid) {
  for (int64_t tile = blockIdx.x; tile < tiles.n_tiles; tile += gridDim.x) {
    Tile t;
    if (!tile_of(tiles, tile, &t)) continue;
    for (int64_t cb = blockIdx.y; cb < grid.blocks; cb += gridDim.y) {
      const int64_t c = cb * kOverlayThreads + threadIdx.x;
      if (c >= a.cols) continue;
      if (GATE_UP) {
        gate_up_column<F>(a, t, c);
      } else {
        down_column<F>(a, t, c);
      }
    }
  }
}

// ---- host twin: the same bodies over every index, the warp reduction in the shuffle-tree order ----

template <typename F>
void grouped_shrink_host(const float* inp, const int64_t* rows, const OverlayTiles& tiles, const void* b, float* out,
                         int64_t in_dim, int64_t rank, int64_t pairs, OverlaySplit split) {
  float acc[32][kMaxTileRows];
  for (int64_t z = 0; z < split.split; ++z) {
    const int64_t k_begin = z * split.k_chunk;
    const int64_t k_end = k_begin + split.k_chunk < in_dim ? k_begin + split.k_chunk : in_dim;
    for (int64_t tile = 0; tile < tiles.n_tiles; ++tile) {
      Tile t;
      if (!tile_of(tiles, tile, &t)) continue;
      for (int64_t j = 0; j < rank; ++j) {
        for (int lane = 0; lane < 32; ++lane)
          shrink_lane<F>(inp, rows, t, b, in_dim, rank, j, k_begin, k_end, lane, acc[lane]);
        for (int off = 16; off > 0; off /= 2)        // lane l adds lane l + off's value from before this step
          for (int lane = 0; lane + off < 32; ++lane)
            for (int m = 0; m < kMaxTileRows; ++m) acc[lane][m] += acc[lane + off][m];
        for (int m = 0; m < t.rows; ++m) out[(z * pairs + t.row0 + m) * rank + j] = acc[0][m];
      }
    }
  }
}

template <bool GATE_UP, typename F>
void expand_host(const OverlayExpandArgs& a, const OverlayTiles& tiles) {
  for (int64_t tile = 0; tile < tiles.n_tiles; ++tile) {
    Tile t;
    if (!tile_of(tiles, tile, &t)) continue;
    for (int64_t c = 0; c < a.cols; ++c) {
      if (GATE_UP) {
        gate_up_column<F>(a, t, c);
      } else {
        down_column<F>(a, t, c);
      }
    }
  }
}

bool valid(const OverlayTiles& t, Storage dtype) {
  return t.block_m >= 1 && t.block_m <= kMaxTileRows &&
         (dtype == Storage::kF32 || dtype == Storage::kBF16 || dtype == Storage::kF16);
}

dim3 dims(const OverlayGrid& g) { return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y)); }

// Run Op<F>::run(args...) for the factor dtype.
template <template <typename> class Op, typename... Args>
void dispatch(Storage dtype, Args&&... args) {
  switch (dtype) {
    case Storage::kBF16: Op<bf16_t>::run(args...); break;
    case Storage::kF16: Op<f16_t>::run(args...); break;
    default: Op<float>::run(args...); break;
  }
}

template <typename F>
struct Shrink {
  static void run(bool host, const OverlayGrid& g, cudaStream_t s, const float* inp, const int64_t* rows,
                  const OverlayTiles& tiles, const void* b, float* out, int64_t in_dim, int64_t rank, int64_t pairs,
                  const OverlaySplit& split) {
    if (host) return grouped_shrink_host<F>(inp, rows, tiles, b, out, in_dim, rank, pairs, split);
    const dim3 grid(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(split.split));
    grouped_shrink_kernel<F><<<grid, kShrinkWarps * 32, 0, s>>>(inp, rows, tiles, b, out, in_dim, rank, pairs, split,
                                                                 g);
  }
};
template <bool GATE_UP>
struct Expand {
  template <typename F>
  struct Op {
    static void run(bool host, const OverlayGrid& g, cudaStream_t s, const OverlayExpandArgs& a,
                    const OverlayTiles& tiles) {
      if (host) return expand_host<GATE_UP, F>(a, tiles);
      expand_kernel<GATE_UP, F><<<dims(g), kOverlayThreads, 0, s>>>(a, tiles, g);
    }
  };
};

int shrink(const float* inp, const int64_t* rows, const OverlayTiles& tiles, const void* b, Storage b_dtype,
           float* out, int64_t pairs, int64_t in_dim, int64_t rank, const OverlaySplit& split, void* stream,
           bool host) {
  if (!valid(tiles, b_dtype) || split.split < 1 || split.split > kMaxGridYZ || split.k_chunk < 1 ||
      split.split * split.k_chunk < in_dim)
    return static_cast<int>(cudaErrorInvalidValue);
  if (pairs == 0 || rank == 0 || tiles.n_tiles == 0) return 0;
  const OverlayGrid g = overlay_grid(tiles.n_tiles, rank, kShrinkWarps);
  dispatch<Shrink>(b_dtype, host, g, static_cast<cudaStream_t>(stream), inp, rows, tiles, b, out, in_dim, rank, pairs,
                   split);
  return host ? 0 : static_cast<int>(cudaGetLastError());
}

template <bool GATE_UP>
int expand(const OverlayExpandArgs& a, const OverlayTiles& tiles, void* stream, bool host) {
  if (!valid(tiles, a.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  if (a.pairs == 0 || a.cols == 0 || tiles.n_tiles == 0) return 0;
  const OverlayGrid g = overlay_grid(tiles.n_tiles, a.cols, kOverlayThreads);
  dispatch<Expand<GATE_UP>::template Op>(a.dtype, host, g, static_cast<cudaStream_t>(stream), a, tiles);
  return host ? 0 : static_cast<int>(cudaGetLastError());
}

}  // namespace

int overlay_grouped_shrink_cuda(const float* inp, const int64_t* rows, const OverlayTiles& tiles, const void* b,
                                Storage b_dtype, float* out, int64_t pairs, int64_t in_dim, int64_t rank,
                                OverlaySplit split, void* stream) {
  return shrink(inp, rows, tiles, b, b_dtype, out, pairs, in_dim, rank, split, stream, false);
}

int overlay_gate_up_expand_cuda(const OverlayExpandArgs& a, const OverlayTiles& tiles, void* stream) {
  return expand<true>(a, tiles, stream, false);
}

int overlay_down_expand_cuda(const OverlayExpandArgs& a, const OverlayTiles& tiles, void* stream) {
  return expand<false>(a, tiles, stream, false);
}

namespace detail {
int overlay_grouped_shrink_host(const float* inp, const int64_t* rows, const OverlayTiles& tiles, const void* b,
                                Storage b_dtype, float* out, int64_t pairs, int64_t in_dim, int64_t rank,
                                OverlaySplit split) {
  return shrink(inp, rows, tiles, b, b_dtype, out, pairs, in_dim, rank, split, nullptr, true);
}
int overlay_gate_up_expand_host(const OverlayExpandArgs& a, const OverlayTiles& tiles) {
  return expand<true>(a, tiles, nullptr, true);
}
int overlay_down_expand_host(const OverlayExpandArgs& a, const OverlayTiles& tiles) {
  return expand<false>(a, tiles, nullptr, true);
}
}  // namespace detail

}  // namespace lazarus
