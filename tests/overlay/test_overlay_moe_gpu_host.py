"""The host-side parts of the GPU overlay that run without a GPU: the CUDA launch geometry (any token count;
the old kernels put tokens on gridDim.y and failed above 65,535) and the shared host/device arithmetic of
overlay_moe_math.h (the GPT-OSS clamp keeps NaN, as torch.clamp in transformers does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lazarus_core.ops.overlay_moe import ACTIVATIONS, activation_reference
from lazarus_core.ops.overlay_moe_gpu import BLOCK_M, tile_map

GRID_Y_LIMIT = 65535


def _cuda_ext():
    return pytest.importorskip("lazarus_core._C_cuda", reason="the CUDA extension was not built here")


@pytest.mark.parametrize("tokens", [1, 3, 65535, 65536, 70000, 2_000_000])
@pytest.mark.parametrize("top_k,n_experts,cols", [(4, 32, 2880), (8, 128, 7168), (1, 2, 1)])
def test_launch_geometry_covers_every_tile_for_any_token_count(tokens, top_k, n_experts, cols):
    C = _cuda_ext()
    assert C.overlay_tile_rows == BLOCK_M
    pairs = tokens * top_k
    n_tiles = pairs // BLOCK_M + min(n_experts, pairs)       # the tile bound tile_map launches
    for extent, per_block in ((cols, C.overlay_threads), (64, C.overlay_shrink_warps)):
        gx, gy, blocks = C.overlay_launch_geometry(n_tiles, extent, per_block)
        assert 1 <= gx <= 2**31 - 1 and 1 <= gy <= GRID_Y_LIMIT
        assert blocks == -(-extent // per_block)
        # The kernels walk tile = blockIdx.x, +gridDim.x ... and block = blockIdx.y, +gridDim.y ...: both cover all.
        assert -(-n_tiles // gx) * gx >= n_tiles and -(-blocks // gy) * gy >= blocks
        assert gx == min(n_tiles, 2**31 - 1)                   # tokens (through tiles) ride on gridDim.x


def test_launch_geometry_caps_huge_extents():
    C = _cuda_ext()
    gx, gy, blocks = C.overlay_launch_geometry(5, 128 * 70000, 128)
    assert (gx, gy, blocks) == (5, GRID_Y_LIMIT, 70000)
    with pytest.raises(ValueError, match="per_block"):
        C.overlay_launch_geometry(1, 1, 0)


def test_tile_map_for_70000_tokens():
    ids = torch.randint(0, 32, (70000, 4))
    m = tile_map(ids, 32)
    used = m.tile_expert >= 0
    ends = torch.minimum(m.tile_row + BLOCK_M, m.offsets[m.tile_expert.clamp(min=0).long() + 1])
    assert int((ends - m.tile_row)[used].sum()) == 70000 * 4 and int(used.sum()) <= m.tile_expert.numel()


def test_portable_gpt_oss_clamp_keeps_nan():
    # The host twin of the CUDA arithmetic (overlay_moe_math.h, bound as overlay_gate_up_portable): rank-1
    # factors of zero, so h = act(gu0 gate, gu0 up) column by column.
    from lazarus_core.ops._backends import cpu_extension

    nan, inf = float("nan"), float("inf")
    g = np.array([nan, 1.0, 9.0, -8.0, nan, inf, -inf, 3.0], dtype=np.float32)
    u = np.array([1.0, nan, 2.0, -9.0, nan, 8.0, 0.5, -inf], dtype=np.float32)
    inter = g.size
    gu0 = np.concatenate([g, u])[None, :]
    zeros = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
    h, hw = zeros(1, inter), zeros(1, inter)
    one = np.zeros(1, dtype=np.int64)
    for activation in ("gpt_oss", "swiglu"):
        cpu_extension().overlay_gate_up_portable(
            gu0, zeros(1, 2), one, np.ones(1, dtype=np.float32), np.array([0, 1], dtype=np.int64), zeros(1, 1, inter),
            zeros(1, 1, inter), None, None, ACTIVATIONS[activation], 1.702, 7.0, h, hw, one, one, 1)
        expected = activation_reference(torch.from_numpy(g), torch.from_numpy(u), activation, 1.702, 7.0).numpy()
        np.testing.assert_array_equal(np.isnan(h[0]), np.isnan(expected))
        np.testing.assert_allclose(h[0], expected, rtol=1e-6, atol=1e-6)
    assert np.isnan(h[0, [0, 1, 4]]).all()
