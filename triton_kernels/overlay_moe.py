"""Overlay MoE low-rank stages in Triton: the grouped shrink of every (token, expert) pair in one launch, and per
(token, column block) the token's k experts through the low-rank expand (rank walked in tiles), bias, activation and
routing-weighted sum. The dense base products stay in cuBLAS."""

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_C = 64
DEFAULT_BLOCK_R = 16
SHRINK_BLOCK_R = 16
SHRINK_BLOCK_K = 128


@triton.jit
def _activation(g, u, ACTIVATION: tl.constexpr, alpha, limit):
    if ACTIVATION == 1:  # GPT-OSS: clamped gate and up, (up + 1)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return g * tl.sigmoid(alpha * g) * (u + 1.0)
    return g * tl.sigmoid(g) * u


@triton.jit
def _expand(s_ptr, at_ptr, e, rank, n, c, mask, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``sum_j s[j] * at[e, j, c]`` for a block of columns: the rank walked in [BLOCK_R, BLOCK_C] tiles."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        j_ok = j < rank
        sv = tl.load(s_ptr + j, mask=j_ok, other=0.0)
        at = tl.load(at_ptr + (e * rank + j[:, None]) * n + c[None, :], mask=j_ok[:, None] & mask[None, :], other=0.0)
        acc += tl.sum(sv[:, None] * at, 0)
    return acc


@triton.jit
def _overlay_shrink_kernel(inp_ptr, rows_ptr, pair_expert_ptr, b_ptr, s_ptr, in_dim, rank, HAS_ROWS: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    j_ok = j < rank
    e = tl.load(pair_expert_ptr + p)
    if HAS_ROWS:
        row = tl.load(rows_ptr + p)
    else:
        row = p
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, in_dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_dim
        xv = tl.load(inp_ptr + row * in_dim + k, mask=k_ok, other=0.0)
        bt = tl.load(b_ptr + (e * rank + j[:, None]) * in_dim + k[None, :], mask=j_ok[:, None] & k_ok[None, :],
                     other=0.0)
        acc += tl.sum(bt * xv[None, :], 1)
    tl.store(s_ptr + p * rank + j, acc, mask=j_ok)


@triton.jit
def _overlay_gate_up_kernel(gu0_ptr, s_ptr, slot_pair_ptr, slot_expert_ptr, weight_ptr, at_gate_ptr, at_up_ptr,
                            bias_gate_ptr, bias_up_ptr, h_ptr, hw_ptr, inter, rank_gate, rank_up, alpha, limit,
                            TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = c < inter
    r = rank_gate + rank_up
    g0 = tl.load(gu0_ptr + t * 2 * inter + c, mask=mask, other=0.0)
    u0 = tl.load(gu0_ptr + t * 2 * inter + inter + c, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k in range(TOP_K):
        p = tl.load(slot_pair_ptr + t * TOP_K + k)
        e = tl.load(slot_expert_ptr + t * TOP_K + k)
        g = g0
        u = u0
        if HAS_BIAS:
            g += tl.load(bias_gate_ptr + e * inter + c, mask=mask, other=0.0)
            u += tl.load(bias_up_ptr + e * inter + c, mask=mask, other=0.0)
        g += _expand(s_ptr + p * r, at_gate_ptr, e, rank_gate, inter, c, mask, BLOCK_R, BLOCK_C)
        u += _expand(s_ptr + p * r + rank_gate, at_up_ptr, e, rank_up, inter, c, mask, BLOCK_R, BLOCK_C)
        h = _activation(g, u, ACTIVATION, alpha, limit)
        tl.store(h_ptr + p * inter + c, h, mask=mask)
        acc += tl.load(weight_ptr + p) * h
    tl.store(hw_ptr + t * inter + c, acc, mask=mask)


@triton.jit
def _overlay_down_kernel(s_ptr, slot_pair_ptr, slot_expert_ptr, weight_ptr, at_down_ptr, bias_down_ptr, y_ptr, hidden,
                         rank_down, TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = c < hidden
    acc = tl.load(y_ptr + t * hidden + c, mask=mask, other=0.0)
    for k in range(TOP_K):
        p = tl.load(slot_pair_ptr + t * TOP_K + k)
        e = tl.load(slot_expert_ptr + t * TOP_K + k)
        v = _expand(s_ptr + p * rank_down, at_down_ptr, e, rank_down, hidden, c, mask, BLOCK_R, BLOCK_C)
        if HAS_BIAS:
            v += tl.load(bias_down_ptr + e * hidden + c, mask=mask, other=0.0)
        acc += tl.load(weight_ptr + p) * v
    tl.store(y_ptr + t * hidden + c, acc, mask=mask)


def overlay_shrink_triton(inp: torch.Tensor, rows: torch.Tensor | None, pair_expert: torch.Tensor, b: torch.Tensor,
                          s: torch.Tensor) -> None:
    """Grouped shrink of every pair in one launch: ``s[p] = b[pair_expert[p]] @ inp[rows[p]]``.

    Parameters
    ----------
    inp : torch.Tensor
        fp32 ``[N, D]`` inputs (tokens, or pairs when ``rows`` is None).
    rows : torch.Tensor or None
        int64 ``[P]`` row of ``inp`` for each pair; None means row ``p``.
    pair_expert : torch.Tensor
        int64 ``[P]`` expert of each pair.
    b : torch.Tensor
        fp32 ``[E, R, D]`` shrink factors.
    s : torch.Tensor
        fp32 ``[P, R]`` output.
    """
    pairs, rank = s.shape
    if pairs == 0 or rank == 0:
        return
    grid = (pairs, triton.cdiv(rank, SHRINK_BLOCK_R))
    _overlay_shrink_kernel[grid](inp, rows if rows is not None else pair_expert, pair_expert, b, s, inp.shape[1], rank,
                                 HAS_ROWS=rows is not None, BLOCK_R=SHRINK_BLOCK_R, BLOCK_K=SHRINK_BLOCK_K)


def overlay_gate_up_triton(gu0: torch.Tensor, s_gu: torch.Tensor, slot_pair: torch.Tensor, slot_expert: torch.Tensor,
                           pair_weight: torch.Tensor, experts, h: torch.Tensor, hw: torch.Tensor) -> None:
    """Fused gate/up stage (contiguous fp32 tensors validated by ``lazarus_core.ops.overlay_moe_forward``).

    Parameters
    ----------
    gu0 : torch.Tensor
        ``[T, 2I]`` base gate and up products.
    s_gu : torch.Tensor
        ``[P, rg + ru]`` shrinks of the expert-sorted pairs.
    slot_pair, slot_expert : torch.Tensor
        int64 ``[T * K]``: sorted pair and expert of slot ``t * K + k``.
    pair_weight : torch.Tensor
        fp32 ``[P]`` routing weight of each sorted pair.
    experts : OverlayExperts
    h : torch.Tensor
        fp32 ``[P, I]`` output: activation of each pair.
    hw : torch.Tensor
        fp32 ``[T, I]`` output: routing-weighted sum of each token's ``h``.
    """
    tokens, inter = hw.shape
    top_k = slot_pair.numel() // tokens
    bias = experts.bias_gate is not None
    grid = (tokens, triton.cdiv(inter, DEFAULT_BLOCK_C))
    _overlay_gate_up_kernel[grid](
        gu0, s_gu, slot_pair, slot_expert, pair_weight, experts.at_gate, experts.at_up,
        experts.bias_gate if bias else gu0, experts.bias_up if bias else gu0, h, hw, inter,
        experts.at_gate.shape[1], experts.at_up.shape[1], experts.alpha, experts.limit,
        TOP_K=top_k, HAS_BIAS=bias, ACTIVATION=1 if experts.activation == "gpt_oss" else 0, BLOCK_C=DEFAULT_BLOCK_C,
        BLOCK_R=DEFAULT_BLOCK_R)


def overlay_down_triton(s_d: torch.Tensor, slot_pair: torch.Tensor, slot_expert: torch.Tensor,
                        pair_weight: torch.Tensor, experts, y: torch.Tensor) -> None:
    """Fused down stage: ``y [T, H] += sum_k w * (A_down[e] s_d + bias_down[e])`` (``s_d`` fp32 ``[P, rd]``)."""
    tokens, hidden = y.shape
    top_k = slot_pair.numel() // tokens
    bias = experts.bias_down is not None
    grid = (tokens, triton.cdiv(hidden, DEFAULT_BLOCK_C))
    _overlay_down_kernel[grid](s_d, slot_pair, slot_expert, pair_weight, experts.at_down,
                               experts.bias_down if bias else y, y, hidden, experts.at_down.shape[1],
                               TOP_K=top_k, HAS_BIAS=bias, BLOCK_C=DEFAULT_BLOCK_C, BLOCK_R=DEFAULT_BLOCK_R)
