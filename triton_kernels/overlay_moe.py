"""Overlay MoE forward in Triton, in storage precision, with the (token, expert) pairs grouped by expert.

A tile is up to ``BLOCK_M`` pairs of ONE expert (rows of the expert-sorted pair order), so each tile reads its
expert's factors once and multiplies them with ``tl.dot`` (fp32 accumulation) instead of one matrix-vector
product per pair. Tiles come from a tile map built on the device (``lazarus_core.ops.overlay_moe_gpu``): no
host sync, so the forward can be captured in a CUDA graph.

- :func:`grouped_shrink_triton`: ``s[q] = B[e(q)] @ inp[rows[q]]`` for every sorted pair ``q``, split over the
  input dimension (split-K) into ``[SPLIT, P, R]`` partials when there are few tiles (decode).
- :func:`gate_up_expand_triton`: ``h[slot] = act(gu0[t] + A_g[e] s_g + b_g[e], gu0'[t] + A_u[e] s_u + b_u[e])``,
  each bias optional on its own.
- :func:`down_expand_triton`: ``corr[slot] = w[slot] * (A_d[e] s_d + b_d[e])``, the routing weight applied in
  the epilogue; the op sums a token's k slots.
- :func:`mxfp4_matmul_triton`: ``out = a @ W^T`` with ``W`` MXFP4 ``[N, K/32, 16]`` blocks + ``[N, K/32]`` scales,
  each tile decoded in registers inside the GEMM (the dense base products of an MXFP4 base).

Factors and float bases are read in their stored dtype (bf16, fp16 or fp32) and converted to fp32 in
registers; factor products use fp32 ``tl.dot`` (``input_precision="ieee"``, no TF32). The MXFP4 GEMM takes
bf16 operands on the GPU when ``DOT_BF16`` (the model runs in bf16: MXFP4 values are exact in bf16) and fp32
otherwise (always in the interpreter, whose ``tl.dot`` on bf16 is wrong).
"""

import torch
import triton
import triton.language as tl

from lazarus_core.ops._backends import triton_interpreter_enabled
from lazarus_core.triton_kernels._mxfp4_math import e2m1_to_f32, e8m0_to_f32

BLOCK_N = 128       # output columns per program
BLOCK_R = 16        # rank step of the expand dots
SHRINK_BLOCK_R = 32
SHRINK_BLOCK_K = 64
MM_BLOCK_M = 16
MM_BLOCK_N = 64
MM_SCALE_GROUPS = 2  # MXFP4 blocks (32 values) per K step of the GEMM
SHRINK_TARGET_PROGRAMS = 128  # split-K until the shrink has about this many programs


@triton.jit
def _activation(g, u, ACTIVATION: tl.constexpr, alpha, limit):
    """SwiGLU ``silu(g) u``, or GPT-OSS's clamped variant. The clamps are selects that keep NaN (as
    ``torch.clamp`` in transformers does): ``min``/``max`` would turn a NaN into the limit."""
    if ACTIVATION == 1:
        g = tl.where(g > limit, limit, g)
        u = tl.where(u > limit, limit, tl.where(u < -limit, -limit, u))
        return g * tl.sigmoid(alpha * g) * (u + 1.0)
    return g * tl.sigmoid(g) * u


@triton.jit
def _tile(tile_expert_ptr, tile_row_ptr, offsets_ptr, BLOCK_M: tl.constexpr):
    """Expert and sorted-pair rows of this program's tile; ``e < 0`` marks an unused tile."""
    tid = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tid)
    row0 = tl.load(tile_row_ptr + tid)
    end = tl.load(offsets_ptr + tl.maximum(e, 0) + 1)
    q = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    return e.to(tl.int64), q, q < end


@triton.jit
def _expand_dot(s_ptr, s_stride, q, q_ok, at_ptr, e, rank, n, c, c_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """``s[q, :rank] @ at[e, :rank, c]`` as a [BLOCK_M, BLOCK_N] fp32 tile (``at`` in its stored dtype)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        j_ok = j < rank
        sv = tl.load(s_ptr + q[:, None] * s_stride + j[None, :], mask=q_ok[:, None] & j_ok[None, :], other=0.0)
        at = tl.load(at_ptr + (e * rank + j[:, None]) * n + c[None, :], mask=j_ok[:, None] & c_ok[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(sv, at, input_precision="ieee")
    return acc


@triton.jit
def _grouped_shrink_kernel(inp_ptr, rows_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, b_ptr, out_ptr, in_dim,
                           rank, pairs, k_chunk, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    e, q, q_ok = _tile(tile_expert_ptr, tile_row_ptr, offsets_ptr, BLOCK_M)
    if e < 0:
        return
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    j_ok = j < rank
    split = tl.program_id(2).to(tl.int64)
    row = tl.load(rows_ptr + q, mask=q_ok, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    k_begin = split * k_chunk
    for k0 in range(0, k_chunk, BLOCK_K):
        k = k_begin + k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_dim
        xv = tl.load(inp_ptr + row[:, None] * in_dim + k[None, :], mask=q_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + (e * rank + j[None, :]) * in_dim + k[:, None], mask=k_ok[:, None] & j_ok[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(xv.to(tl.float32), bt, input_precision="ieee")
    tl.store(out_ptr + (split * pairs + q[:, None]) * rank + j[None, :], acc, mask=q_ok[:, None] & j_ok[None, :])


@triton.jit
def _gate_up_expand_kernel(gu0_ptr, s_ptr, slot_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, at_gate_ptr,
                           at_up_ptr, bias_gate_ptr, bias_up_ptr, h_ptr, inter, rank_gate, rank_up, alpha, limit,
                           TOP_K: tl.constexpr, HAS_BIAS_GATE: tl.constexpr, HAS_BIAS_UP: tl.constexpr,
                           ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    e, q, q_ok = _tile(tile_expert_ptr, tile_row_ptr, offsets_ptr, BLOCK_M)
    if e < 0:
        return
    c = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    c_ok = c < inter
    mask = q_ok[:, None] & c_ok[None, :]
    slot = tl.load(slot_ptr + q, mask=q_ok, other=0)
    tok = slot // TOP_K
    r = rank_gate + rank_up
    g = tl.load(gu0_ptr + tok[:, None] * 2 * inter + c[None, :], mask=mask, other=0.0)
    u = tl.load(gu0_ptr + tok[:, None] * 2 * inter + inter + c[None, :], mask=mask, other=0.0)
    g += _expand_dot(s_ptr, r, q, q_ok, at_gate_ptr, e, rank_gate, inter, c, c_ok, BLOCK_M, BLOCK_N, BLOCK_R)
    u += _expand_dot(s_ptr + rank_gate, r, q, q_ok, at_up_ptr, e, rank_up, inter, c, c_ok, BLOCK_M, BLOCK_N, BLOCK_R)
    if HAS_BIAS_GATE:
        g += tl.load(bias_gate_ptr + e * inter + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS_UP:
        u += tl.load(bias_up_ptr + e * inter + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(h_ptr + slot[:, None] * inter + c[None, :], _activation(g, u, ACTIVATION, alpha, limit), mask=mask)


@triton.jit
def _down_expand_kernel(s_ptr, slot_ptr, weight_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, at_down_ptr,
                        bias_down_ptr, corr_ptr, hidden, rank_down, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    e, q, q_ok = _tile(tile_expert_ptr, tile_row_ptr, offsets_ptr, BLOCK_M)
    if e < 0:
        return
    c = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    c_ok = c < hidden
    slot = tl.load(slot_ptr + q, mask=q_ok, other=0)
    v = _expand_dot(s_ptr, rank_down, q, q_ok, at_down_ptr, e, rank_down, hidden, c, c_ok, BLOCK_M, BLOCK_N, BLOCK_R)
    if HAS_BIAS:
        v += tl.load(bias_down_ptr + e * hidden + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w = tl.load(weight_ptr + slot, mask=q_ok, other=0.0)
    tl.store(corr_ptr + slot[:, None] * hidden + c[None, :], v * w[:, None], mask=q_ok[:, None] & c_ok[None, :])


@triton.jit
def _mxfp4_matmul_kernel(a_ptr, blocks_ptr, scales_ptr, out_ptr, m, n, groups, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, DOT_BF16: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_ok = rm < m
    n_ok = rn < n
    kdim = groups * 32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    gi = tl.arange(0, GROUPS)
    for g0 in range(0, groups, GROUPS):
        g = g0 + gi
        g_ok = g < groups
        wmask = n_ok[:, None, None] & g_ok[None, :, None]
        packed = tl.load(blocks_ptr + (rn[:, None, None] * groups + g[None, :, None]) * 16
                         + tl.arange(0, 16)[None, None, :], mask=wmask, other=0).to(tl.int32)
        scale = e8m0_to_f32(tl.load(scales_ptr + rn[:, None] * groups + g[None, :],
                                    mask=n_ok[:, None] & g_ok[None, :], other=127).to(tl.int32))
        w = e2m1_to_f32(tl.interleave(packed & 15, packed >> 4)) * scale[:, :, None]   # [BN, GROUPS, 32]
        w = tl.reshape(w, [BLOCK_N, GROUPS * 32])
        k = g0 * 32 + tl.arange(0, GROUPS * 32)
        av = tl.load(a_ptr + rm[:, None] * kdim + k[None, :], mask=m_ok[:, None] & (k < kdim)[None, :], other=0.0)
        if DOT_BF16:
            acc += tl.dot(av.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        else:
            acc += tl.dot(av.to(tl.float32), tl.trans(w), input_precision="ieee")
    tl.store(out_ptr + rm[:, None] * n + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def _programs_ok(*tensors: torch.Tensor) -> bool:
    return all(t.numel() for t in tensors)


def shrink_split(programs: int, in_dim: int) -> tuple[int, int]:
    """``(split, k_chunk)``: split the input dimension into ``split`` chunks of ``k_chunk`` (a multiple of
    :data:`SHRINK_BLOCK_K`) until the shrink has about :data:`SHRINK_TARGET_PROGRAMS` programs (decode)."""
    k_steps = triton.cdiv(in_dim, SHRINK_BLOCK_K)
    split = max(1, min(k_steps, SHRINK_TARGET_PROGRAMS // max(1, programs)))
    k_chunk = triton.cdiv(k_steps, split) * SHRINK_BLOCK_K
    return triton.cdiv(in_dim, k_chunk), k_chunk


def grouped_shrink_triton(inp: torch.Tensor, rows: torch.Tensor, tiles: tuple,
                          b: torch.Tensor, pairs: int) -> torch.Tensor:
    """Grouped shrink ``s[q] = b[e(q)] @ inp[rows[q]]`` of every expert-sorted pair.

    Parameters
    ----------
    inp : torch.Tensor
        ``[N, D]`` contiguous (any float dtype; read and computed in fp32).
    rows : torch.Tensor
        int64 ``[P]``: the row of ``inp`` of sorted pair ``q``.
    tiles : tuple
        ``(tile_expert int32 [n_tiles] (-1: unused), tile_row int64 [n_tiles], offsets int64 [E+1], block_m)``:
        tiles of at most ``block_m`` (a power of two >= 16) pairs of one expert
        (:func:`lazarus_core.ops.overlay_moe_gpu.tile_map`).
    b : torch.Tensor
        ``[E, R, D]`` shrink factors in their stored dtype.
    pairs : int
        ``P``.

    Returns
    -------
    torch.Tensor
        fp32 ``[P, R]``.
    """
    tile_expert, tile_row, offsets, block_m = tiles
    rank, in_dim = b.shape[1], b.shape[2]
    if pairs == 0 or rank == 0 or in_dim == 0:
        return torch.zeros(pairs, rank, dtype=torch.float32, device=inp.device)
    rank_blocks = triton.cdiv(rank, SHRINK_BLOCK_R)
    split, k_chunk = shrink_split(tile_expert.numel() * rank_blocks, in_dim)
    out = torch.empty(split, pairs, rank, dtype=torch.float32, device=inp.device)
    _grouped_shrink_kernel[(tile_expert.numel(), rank_blocks, split)](
        inp, rows, tile_expert, tile_row, offsets, b, out, in_dim, rank, pairs, k_chunk, BLOCK_M=block_m,
        BLOCK_R=SHRINK_BLOCK_R, BLOCK_K=SHRINK_BLOCK_K)
    return out[0] if split == 1 else out.sum(0)


def gate_up_expand_triton(gu0: torch.Tensor, s_gu: torch.Tensor, slot: torch.Tensor,
                          tiles: tuple, experts, top_k: int,
                          h: torch.Tensor) -> None:
    """Fused expand + biases + activation of every pair, written to ``h`` at the pair's slot.

    Parameters
    ----------
    gu0 : torch.Tensor
        fp32 ``[T, 2I]`` base gate and up products.
    s_gu : torch.Tensor
        fp32 ``[P, rg + ru]`` shrinks of the sorted pairs.
    slot : torch.Tensor
        int64 ``[P]``: slot ``t * K + k`` of sorted pair ``q``.
    tiles : tuple
        As in :func:`grouped_shrink_triton`.
    experts : OverlayExperts
        ``at_gate [E, rg, I]``, ``at_up [E, ru, I]``, ``bias_gate``/``bias_up [E, I]`` or None (each on its own).
    top_k : int
    h : torch.Tensor
        fp32 ``[T * K, I]`` output.
    """
    tile_expert, tile_row, offsets, block_m = tiles
    inter = h.shape[1]
    if not _programs_ok(tile_expert, h):
        return
    bg, bu = experts.bias_gate, experts.bias_up
    _gate_up_expand_kernel[(tile_expert.numel(), triton.cdiv(inter, BLOCK_N))](
        gu0, s_gu, slot, tile_expert, tile_row, offsets, experts.at_gate, experts.at_up,
        bg if bg is not None else gu0, bu if bu is not None else gu0, h, inter, experts.at_gate.shape[1],
        experts.at_up.shape[1], experts.alpha, experts.limit, TOP_K=top_k, HAS_BIAS_GATE=bg is not None,
        HAS_BIAS_UP=bu is not None, ACTIVATION=1 if experts.activation == "gpt_oss" else 0, BLOCK_M=block_m,
        BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)


def down_expand_triton(s_d: torch.Tensor, slot: torch.Tensor, slot_weight: torch.Tensor,
                       tiles: tuple, experts, corr: torch.Tensor) -> None:
    """``corr[slot] = w[slot] * (A_down[e] s_d[q] + bias_down[e])`` for every sorted pair ``q``.

    ``s_d`` is fp32 ``[P, rd]``, ``slot_weight`` fp32 ``[T * K]`` (the routing weight of each slot), ``corr`` the
    fp32 ``[T * K, H]`` output; ``slot``, ``tiles`` and ``experts`` as in :func:`gate_up_expand_triton`.
    """
    bd = experts.bias_down
    tile_expert, tile_row, offsets, block_m = tiles
    hidden = corr.shape[1]
    if not _programs_ok(tile_expert, corr):
        return
    _down_expand_kernel[(tile_expert.numel(), triton.cdiv(hidden, BLOCK_N))](
        s_d, slot, slot_weight, tile_expert, tile_row, offsets, experts.at_down, bd if bd is not None else corr, corr,
        hidden, experts.at_down.shape[1], HAS_BIAS=bd is not None, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)


def mxfp4_matmul_triton(a: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, *, bf16_dot: bool = False
                        ) -> torch.Tensor:
    """``a @ decode(blocks, scales)^T`` with the MXFP4 weight decoded tile by tile inside the GEMM.

    Parameters
    ----------
    a : torch.Tensor
        ``[M, K]`` contiguous float.
    blocks, scales : torch.Tensor
        uint8 ``[N, K/32, 16]`` and ``[N, K/32]`` (the gpt-oss layout, quantised along K).
    bf16_dot : bool
        Round ``a`` to bf16 and use bf16 tensor-core dots (GPU only; ignored in the interpreter).

    Returns
    -------
    torch.Tensor
        fp32 ``[M, N]``.
    """
    n, groups = scales.shape
    m = a.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=a.device)
    if m == 0 or n == 0:
        return out
    if groups == 0:
        return out.zero_()
    grid = (triton.cdiv(m, MM_BLOCK_M), triton.cdiv(n, MM_BLOCK_N))
    _mxfp4_matmul_kernel[grid](a, blocks, scales, out, m, n, groups, BLOCK_M=MM_BLOCK_M, BLOCK_N=MM_BLOCK_N,
                               GROUPS=MM_SCALE_GROUPS, DOT_BF16=bool(bf16_dot) and not triton_interpreter_enabled())
    return out
