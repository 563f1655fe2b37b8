// Why: the overlay's low-rank stages on the GPU, on tiles of (token, expert) pairs of one expert
// (overlay_moe_gpu.h), reading the factors in their storage dtype.
// - grouped shrink: one warp per rank row j of B[e]; the warp streams that row once per tile (coalesced, in
//   storage dtype) and accumulates the dot with each of the tile's up-to-16 input rows in registers, then
//   reduces across lanes. No per-expert GEMM launches, no host sync.
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

template <typename F>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  return to_float(static_cast<const F*>(p)[i]);
}

struct Tile {
  int64_t expert, row0, rows;
};

__device__ __forceinline__ bool tile_of(const OverlayTiles& t, int64_t tile, Tile* out) {
  const int32_t e = t.tile_expert[tile];
  if (e < 0) return false;
  const int64_t row0 = t.tile_row[tile];
  const int64_t end = t.offsets[e + 1];
  out->expert = e;
  out->row0 = row0;
  out->rows = end - row0 < t.block_m ? end - row0 : t.block_m;
  return out->rows > 0;
}

template <typename F>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    grouped_shrink_kernel(const float* __restrict__ inp, const int64_t* __restrict__ rows, OverlayTiles tiles,
                          const void* __restrict__ b, float* __restrict__ out, int64_t in_dim, int64_t rank,
                          OverlayGrid grid) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t tile = blockIdx.x; tile < tiles.n_tiles; tile += gridDim.x) {
    Tile t;
    if (!tile_of(tiles, tile, &t)) continue;
    const float* x[kMaxTileRows];
    for (int m = 0; m < kMaxTileRows; ++m) x[m] = inp + (m < t.rows ? rows[t.row0 + m] : 0) * in_dim;
    for (int64_t rb = blockIdx.y; rb < grid.blocks; rb += gridDim.y) {
      const int64_t j = rb * kShrinkWarps + warp;
      if (j >= rank) continue;
      const int64_t brow = (t.expert * rank + j) * in_dim;
      float acc[kMaxTileRows] = {};
      for (int64_t k = lane; k < in_dim; k += 32) {
        const float bv = load<F>(b, brow + k);
#pragma unroll
        for (int m = 0; m < kMaxTileRows; ++m)
          if (m < t.rows) acc[m] += bv * x[m][k];
      }
#pragma unroll
      for (int m = 0; m < kMaxTileRows; ++m) {
        float v = acc[m];
        for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0 && m < t.rows) out[(t.row0 + m) * rank + j] = v;
      }
    }
  }
}

// acc[m] += sum_j s[(row0 + m) * s_stride + j] * at[(e * rank + j) * cols + c] for the tile's rows.
template <typename F>
__device__ __forceinline__ void expand_tile(const float* s, int64_t s_stride, const void* at, const Tile& t,
                                            int64_t rank, int64_t cols, int64_t c, float* acc) {
  for (int64_t j = 0; j < rank; ++j) {
    const float a = load<F>(at, (t.expert * rank + j) * cols + c);
#pragma unroll
    for (int m = 0; m < kMaxTileRows; ++m)
      if (m < t.rows) acc[m] += s[(t.row0 + m) * s_stride + j] * a;
  }
}

// body(tile, c) for every tile and every column c < cols this thread owns (grid-stride on both axes).
template <typename Body>
__device__ __forceinline__ void for_each_tile_column(const OverlayTiles& tiles, const OverlayGrid& grid, int64_t cols,
                                                     Body body) {
  for (int64_t tile = blockIdx.x; tile < tiles.n_tiles; tile += gridDim.x) {
    Tile t;
    if (!tile_of(tiles, tile, &t)) continue;
    for (int64_t cb = blockIdx.y; cb < grid.blocks; cb += gridDim.y) {
      const int64_t c = cb * kOverlayThreads + threadIdx.x;
      if (c < cols) body(t, c);
    }
  }
}

template <typename F>
__global__ void __launch_bounds__(kOverlayThreads) gate_up_expand_kernel(OverlayExpandArgs a, OverlayTiles tiles,
                                                                         OverlayGrid grid) {
  const int64_t I = a.cols, rg = a.rank0, ru = a.rank1;
  for_each_tile_column(tiles, grid, I, [&](const Tile& t, int64_t c) {
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
  });
}

template <typename F>
__global__ void __launch_bounds__(kOverlayThreads) down_expand_kernel(OverlayExpandArgs a, OverlayTiles tiles,
                                                                      OverlayGrid grid) {
  const int64_t H = a.cols, rd = a.rank0;
  for_each_tile_column(tiles, grid, H, [&](const Tile& t, int64_t c) {
    float v[kMaxTileRows] = {};
    expand_tile<F>(a.s, rd, a.at0, t, rd, H, c, v);
    const float bd = a.bias0 ? load<F>(a.bias0, t.expert * H + c) : 0.0f;
#pragma unroll
    for (int m = 0; m < kMaxTileRows; ++m) {
      if (m >= t.rows) continue;
      const int64_t slot = a.slot[t.row0 + m];
      a.out[slot * H + c] = a.weight[slot] * (v[m] + bd);
    }
  });
}

bool valid(const OverlayTiles& t, Storage dtype) {
  return t.block_m >= 1 && t.block_m <= kMaxTileRows &&
         (dtype == Storage::kF32 || dtype == Storage::kBF16 || dtype == Storage::kF16);
}

dim3 dims(const OverlayGrid& g) { return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y)); }

// Launch kernel<F> for the factor dtype.
template <template <typename> class K, typename... Args>
int launch(Storage dtype, const OverlayGrid& g, int threads, void* stream, Args... args) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case Storage::kBF16: K<bf16_t>::run(dims(g), threads, s, args...); break;
    case Storage::kF16: K<f16_t>::run(dims(g), threads, s, args...); break;
    default: K<float>::run(dims(g), threads, s, args...); break;
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename F>
struct Shrink {
  template <typename... A>
  static void run(dim3 grid, int threads, cudaStream_t s, A... args) {
    grouped_shrink_kernel<F><<<grid, threads, 0, s>>>(args...);
  }
};
template <typename F>
struct GateUp {
  template <typename... A>
  static void run(dim3 grid, int threads, cudaStream_t s, A... args) {
    gate_up_expand_kernel<F><<<grid, threads, 0, s>>>(args...);
  }
};
template <typename F>
struct Down {
  template <typename... A>
  static void run(dim3 grid, int threads, cudaStream_t s, A... args) {
    down_expand_kernel<F><<<grid, threads, 0, s>>>(args...);
  }
};

}  // namespace

int overlay_grouped_shrink_cuda(const float* inp, const int64_t* rows, const OverlayTiles& tiles, const void* b,
                                Storage b_dtype, float* out, int64_t pairs, int64_t in_dim, int64_t rank,
                                void* stream) {
  if (!valid(tiles, b_dtype)) return static_cast<int>(cudaErrorInvalidValue);
  if (pairs == 0 || rank == 0 || tiles.n_tiles == 0) return 0;
  if (in_dim == 0) return static_cast<int>(cudaMemsetAsync(out, 0, sizeof(float) * pairs * rank,
                                                           static_cast<cudaStream_t>(stream)));
  const OverlayGrid g = overlay_grid(tiles.n_tiles, rank, kShrinkWarps);
  return launch<Shrink>(b_dtype, g, kShrinkWarps * 32, stream, inp, rows, tiles, b, out, in_dim, rank, g);
}

int overlay_gate_up_expand_cuda(const OverlayExpandArgs& a, const OverlayTiles& tiles, void* stream) {
  if (!valid(tiles, a.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  if (a.pairs == 0 || a.cols == 0 || tiles.n_tiles == 0) return 0;
  const OverlayGrid g = overlay_grid(tiles.n_tiles, a.cols, kOverlayThreads);
  return launch<GateUp>(a.dtype, g, kOverlayThreads, stream, a, tiles, g);
}

int overlay_down_expand_cuda(const OverlayExpandArgs& a, const OverlayTiles& tiles, void* stream) {
  if (!valid(tiles, a.dtype)) return static_cast<int>(cudaErrorInvalidValue);
  if (a.pairs == 0 || a.cols == 0 || tiles.n_tiles == 0) return 0;
  const OverlayGrid g = overlay_grid(tiles.n_tiles, a.cols, kOverlayThreads);
  return launch<Down>(a.dtype, g, kOverlayThreads, stream, a, tiles, g);
}

}  // namespace lazarus
