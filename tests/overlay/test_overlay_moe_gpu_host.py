"""The parts of the CUDA overlay that run without a GPU: the launch geometry (any token count; the old kernels
put tokens on gridDim.y and failed above 65,535), the shared host/device arithmetic of overlay_moe_math.h (the
GPT-OSS clamp keeps NaN, as torch.clamp in transformers does), and the host twin of the CUDA kernels' bodies
(_C_cuda *_host) inside the GPU pipeline, against the reference."""

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


@pytest.fixture
def cuda_host_backend(monkeypatch):
    """The GPU pipeline of overlay_moe_gpu with the CUDA kernels' host twin (_C_cuda *_host) as its kernels."""
    _cuda_ext()
    from lazarus_core.ops import overlay_moe_gpu

    monkeypatch.setitem(overlay_moe_gpu._BACKENDS, "cuda_host", lambda dev: overlay_moe_gpu._Cuda(dev, host=True))
    return lambda x, ids, w, ex: overlay_moe_gpu.overlay_moe_forward_gpu(x, ids, w, ex, "cuda_host")


# (tokens, top_k, factor dtype, base, activation, ranks, hidden, inter); hidden 600 at T = 1 splits the shrink's K.
_TWIN_CASES = [(1, 1, torch.float32, "fp32", "swiglu", (1, 1, 1), 45, 23),
               (1, 2, torch.bfloat16, "fp32", "gpt_oss", (3, 5, 2), 600, 23),
               (3, 2, torch.bfloat16, "bf16", "gpt_oss", (3, 5, 2), 45, 23),
               (17, 4, torch.float16, "fp32", "gpt_oss", (0, 0, 0), 45, 23),
               (40, 8, torch.bfloat16, "mxfp4", "gpt_oss", (4, 1, 33), 64, 96),
               (130, 3, torch.bfloat16, "fp32", "swiglu", (5, 3, 2), 45, 23)]


@pytest.mark.parametrize("tokens,top_k,factor_dtype,base,activation,ranks,hidden,inter", _TWIN_CASES,
                         ids=lambda v: str(v))
def test_cuda_kernel_bodies_match_reference(cuda_host_backend, tokens, top_k, factor_dtype, base, activation, ranks,
                                            hidden, inter):
    # The per-tile bodies the CUDA kernels run (tile lookup, storage-dtype loads, split-K shrink with the
    # warp-tree reduction, expands, biases, activation, weighted epilogue) over every index, vs the reference.
    from tests.overlay.random_overlay import random_overlay, random_routing
    from lazarus_core.ops import overlay_moe_forward_reference

    ex = random_overlay(9, hidden, inter, ranks, bias=activation == "gpt_oss", activation=activation,
                        factor_dtype=factor_dtype, base=base)
    x = torch.randn(tokens, hidden) * 2
    ids, w = random_routing(tokens, 9, top_k)
    out = cuda_host_backend(x, ids, w, ex)
    ref = overlay_moe_forward_reference(x.double(), ids, w.double(), ex.to_float(torch.float64))
    err = float((out.double() - ref).norm() / ref.norm())
    assert torch.isfinite(out).all() and err < 2e-6, f"relative error {err:.2e}"


def test_cuda_kernel_bodies_each_bias_and_nan(cuda_host_backend):
    from dataclasses import replace

    from tests.overlay.random_overlay import random_overlay, random_routing
    from lazarus_core.ops import overlay_moe_forward_reference

    full = random_overlay(5, 37, 21, (3, 2, 4), bias=True, activation="gpt_oss", factor_dtype=torch.bfloat16)
    x = torch.randn(9, 37)
    ids, w = random_routing(9, 5, 2)
    for keep in ("gate", "up", "down"):
        ex = replace(full, **{f"bias_{p}": None for p in ("gate", "up", "down") if p != keep})
        ref = overlay_moe_forward_reference(x, ids, w, ex)
        torch.testing.assert_close(cuda_host_backend(x, ids, w, ex), ref, atol=1e-4, rtol=1e-4)
    x[2, 5] = float("nan")
    out, ref = cuda_host_backend(x, ids, w, full), overlay_moe_forward_reference(x, ids, w, full)
    assert torch.isnan(ref[2]).all() and torch.equal(torch.isnan(out), torch.isnan(ref))


def test_cuda_host_twin_rejects_bad_arguments():
    C = _cuda_ext()
    #        inp rows tile_e tile_r offs n_tiles block_m b dtype out pairs in_dim rank split k_chunk stream
    with pytest.raises(ValueError, match="block_m"):
        C.overlay_grouped_shrink_host(0, 0, 0, 0, 0, 1, 17, 0, 0, 0, 1, 1, 1, 1, 32, 0)
    with pytest.raises(ValueError, match="dtype code"):
        C.overlay_grouped_shrink_host(0, 0, 0, 0, 0, 0, 16, 0, 5, 0, 1, 1, 1, 1, 32, 0)
    with pytest.raises(ValueError, match="cover in_dim"):
        C.overlay_grouped_shrink_host(0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 1, 100, 1, 3, 32, 0)


@pytest.mark.parametrize("n_tiles,rank,in_dim,target", [(4, 128, 2880, 264), (1, 1, 600, 128), (3000, 64, 2880, 264),
                                                        (2, 19, 0, 128), (1, 8, 31, 128), (5, 64, 100_000, 10**6)])
def test_shrink_split_covers_the_input_dimension(n_tiles, rank, in_dim, target):
    C = _cuda_ext()
    split, chunk = C.overlay_shrink_split(n_tiles, rank, in_dim, target)
    assert 1 <= split <= GRID_Y_LIMIT and chunk % 32 == 0 and chunk >= 32
    assert split * chunk >= in_dim and (split - 1) * chunk < max(in_dim, 1)      # every input once, no empty chunk
    blocks = n_tiles * -(-rank // C.overlay_shrink_warps)
    if blocks >= target or in_dim <= 256:
        assert split == 1                                                       # prefill / tiny K: no split
    else:
        assert split > 1 and blocks * split <= target
