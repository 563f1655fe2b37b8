// Why: the contract of the GPU overlay kernels (overlay_moe_cuda.cu), which read the overlay in its storage
// precision and work on TILES: up to kMaxTileRows (token, expert) pairs of one expert, so that each tile
// reads its expert's factors once instead of once per pair.
//
// Pairs are sorted by expert (stable). The op layer (lazarus_core/ops/overlay_moe_gpu.py, tile_map) builds on
// the device, without a host sync:
//   slot        [P] int64     slot t*K + k of sorted pair q (token t = slot / K)
//   offsets     [E+1] int64   sorted pairs offsets[e] .. offsets[e+1]-1 use expert e
//   tile_expert [n_tiles] int32, -1 for an unused tile;  tile_row [n_tiles] int64 first sorted pair of a tile
//   (a tile ends after block_m pairs or at its expert's end; block_m <= kMaxTileRows).
// Factors and biases are fp32, bf16 or fp16 (Storage::kF32/kBF16/kF16 from common/float_bits.h), converted to
// fp32 in registers; every sum accumulates in fp32. Inputs and outputs below are fp32 unless stated.
//   grouped shrink   out [split, P, rank]: sum over z of out[z, q] = B[e(q)] @ inp[rows[q]],
//                    B [E, rank, in_dim], inp [*, in_dim] (split-K, overlay_shrink_split)
//   gate_up expand   h [T*K, I] row slot(q) = act(gu0[t, :I] + A_g[e] s[q, :rg] + bias_g[e],
//                                                 gu0[t, I:] + A_u[e] s[q, rg:] + bias_u[e])
//                    with s = s_gu [P, rg+ru], at_gate [E, rg, I], at_up [E, ru, I], biases [E, I] or null
//                    (each on its own), activation as in overlay_moe.h
//   down expand      corr [T*K, H] row slot(q) = w[slot(q)] * (A_d[e] s_d[q] + bias_d[e]),
//                    s_d [P, rd], at_down [E, rd, H], bias_down [E, H] or null, w [T*K]
// Every output element is written by exactly one thread (deterministic, no atomics). Launchers take device
// pointers and return a cudaError_t as int (cudaErrorInvalidValue for a bad block_m or dtype).
#pragma once

#include <cstdint>

#include "common/float_bits.h"

namespace lazarus {

constexpr int kMaxTileRows = 16;        // pairs per tile held in registers
constexpr int kOverlayThreads = 128;    // threads per block of the expand kernels (one output column each)
constexpr int kShrinkWarps = 8;         // warps per block of the shrink kernel (one rank row each)
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

struct OverlayTiles {
  const int32_t* tile_expert;
  const int64_t* tile_row;
  const int64_t* offsets;
  int64_t n_tiles;
  int block_m;
};

// The launch grid of a kernel over n_tiles tiles x `work` column (or rank-row) blocks: tiles on gridDim.x,
// blocks on gridDim.y, each capped at the hardware limit; the kernels walk both with grid-stride loops, so
// every (tile, block) is covered for any number of tokens (tokens are never a grid dimension).
struct OverlayGrid {
  int64_t x, y;
  int64_t blocks;   // column (or rank-row) blocks per tile
};

LZ_HD OverlayGrid overlay_grid(int64_t n_tiles, int64_t extent, int64_t per_block) {
  OverlayGrid g;
  g.blocks = (extent + per_block - 1) / per_block;
  g.x = n_tiles < kMaxGridX ? n_tiles : kMaxGridX;
  g.y = g.blocks < kMaxGridYZ ? g.blocks : kMaxGridYZ;
  return g;
}

// Split-K of the grouped shrink for decode: with few tiles, the input dimension is cut into `split` chunks of
// `k_chunk` (a multiple of 32) so that about target_blocks blocks run; chunk z writes partials to
// out[z, P, rank] (the op sums them). split = 1 when the tiles alone fill the target.
struct OverlaySplit {
  int64_t split, k_chunk;
};

LZ_HD OverlaySplit overlay_shrink_split(int64_t n_tiles, int64_t rank, int64_t in_dim, int64_t target_blocks) {
  const int64_t blocks = n_tiles * ((rank + kShrinkWarps - 1) / kShrinkWarps);
  const int64_t steps = (in_dim + 255) / 256;                     // at least 256 inputs (8 per lane) a chunk
  const int64_t most = steps < kMaxGridYZ ? steps : kMaxGridYZ;
  int64_t split = blocks > 0 ? target_blocks / blocks : 1;
  split = split > most ? most : split;
  split = split < 1 ? 1 : split;
  const int64_t chunk = ((in_dim + split - 1) / split + 31) / 32 * 32;
  if (chunk == 0) return OverlaySplit{1, 32};                      // in_dim = 0
  return OverlaySplit{(in_dim + chunk - 1) / chunk, chunk};
}

#if defined(LAZARUS_WITH_CUDA)
// out [split.split, pairs, rank] (see overlay_shrink_split).
int overlay_grouped_shrink_cuda(const float* inp, const int64_t* rows, const OverlayTiles& tiles, const void* b,
                                Storage b_dtype, float* out, int64_t pairs, int64_t in_dim, int64_t rank,
                                OverlaySplit split, void* stream);

struct OverlayExpandArgs {
  const float* s;            // [P, rank_total] shrinks of the sorted pairs
  const int64_t* slot;       // [P]
  const void* at0;           // at_gate (gate_up) or at_down (down)
  const void* at1;           // at_up (gate_up) or null
  const void* bias0;         // bias_gate or bias_down, may be null
  const void* bias1;         // bias_up, may be null
  Storage dtype;             // of the factors and biases
  int64_t pairs, cols, rank0, rank1, top_k;
  int activation;
  float alpha, limit;
  const float* gu0;          // gate_up: [T, 2I]
  const float* weight;       // down: [T*K]
  float* out;                // h [T*K, I] or corr [T*K, H]
};

int overlay_gate_up_expand_cuda(const OverlayExpandArgs& a, const OverlayTiles& tiles, void* stream);
int overlay_down_expand_cuda(const OverlayExpandArgs& a, const OverlayTiles& tiles, void* stream);

namespace detail {
// The host twin: the kernels' per-(tile, row/column) bodies run over every index on HOST pointers, the
// warp reduction in the shuffle-tree order (bound as *_host in _C_cuda; the CPU tests run it).
int overlay_grouped_shrink_host(const float* inp, const int64_t* rows, const OverlayTiles& tiles, const void* b,
                                Storage b_dtype, float* out, int64_t pairs, int64_t in_dim, int64_t rank,
                                OverlaySplit split);
int overlay_gate_up_expand_host(const OverlayExpandArgs& a, const OverlayTiles& tiles);
int overlay_down_expand_host(const OverlayExpandArgs& a, const OverlayTiles& tiles);
}  // namespace detail
#endif

}  // namespace lazarus
