"""Overlay MoE fused stages in Triton: per (token, column block), walk the token's k experts through the
low-rank expand, bias, activation and routing-weighted sum (the dense products stay in cuBLAS)."""

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_C = 256


@triton.jit
def _activation(g, u, ACTIVATION: tl.constexpr, alpha, limit):
    if ACTIVATION == 1:  # GPT-OSS: clamped gate and up, (up + 1)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return g * tl.sigmoid(alpha * g) * (u + 1.0)
    return g * tl.sigmoid(g) * u


@triton.jit
def _overlay_gate_up_kernel(gu0_ptr, s_ptr, slot_pair_ptr, slot_expert_ptr, weight_ptr, at_gate_ptr, at_up_ptr,
                            bias_gate_ptr, bias_up_ptr, h_ptr, hw_ptr, inter, rank_gate, rank_up, alpha, limit,
                            TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = c < inter
    r = rank_gate + rank_up
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k in range(TOP_K):
        p = tl.load(slot_pair_ptr + t * TOP_K + k)
        e = tl.load(slot_expert_ptr + t * TOP_K + k)
        g = tl.load(gu0_ptr + t * 2 * inter + c, mask=mask, other=0.0)
        u = tl.load(gu0_ptr + t * 2 * inter + inter + c, mask=mask, other=0.0)
        if HAS_BIAS:
            g += tl.load(bias_gate_ptr + e * inter + c, mask=mask, other=0.0)
            u += tl.load(bias_up_ptr + e * inter + c, mask=mask, other=0.0)
        for j in range(rank_gate):
            g += tl.load(s_ptr + p * r + j) * tl.load(at_gate_ptr + (e * rank_gate + j) * inter + c, mask=mask, other=0.0)
        for j in range(rank_up):
            u += tl.load(s_ptr + p * r + rank_gate + j) * tl.load(at_up_ptr + (e * rank_up + j) * inter + c, mask=mask,
                                                                 other=0.0)
        h = _activation(g, u, ACTIVATION, alpha, limit)
        tl.store(h_ptr + p * inter + c, h, mask=mask)
        acc += tl.load(weight_ptr + p) * h
    tl.store(hw_ptr + t * inter + c, acc, mask=mask)


@triton.jit
def _overlay_down_kernel(s_ptr, slot_pair_ptr, slot_expert_ptr, weight_ptr, at_down_ptr, bias_down_ptr, y_ptr, hidden,
                         rank_down, TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = c < hidden
    acc = tl.load(y_ptr + t * hidden + c, mask=mask, other=0.0)
    for k in range(TOP_K):
        p = tl.load(slot_pair_ptr + t * TOP_K + k)
        e = tl.load(slot_expert_ptr + t * TOP_K + k)
        v = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_down_ptr + e * hidden + c, mask=mask, other=0.0)
        for j in range(rank_down):
            v += tl.load(s_ptr + p * rank_down + j) * tl.load(at_down_ptr + (e * rank_down + j) * hidden + c, mask=mask,
                                                              other=0.0)
        acc += tl.load(weight_ptr + p) * v
    tl.store(y_ptr + t * hidden + c, acc, mask=mask)


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
        TOP_K=top_k, HAS_BIAS=bias, ACTIVATION=1 if experts.activation == "gpt_oss" else 0, BLOCK_C=DEFAULT_BLOCK_C)


def overlay_down_triton(s_d: torch.Tensor, slot_pair: torch.Tensor, slot_expert: torch.Tensor,
                        pair_weight: torch.Tensor, experts, y: torch.Tensor) -> None:
    """Fused down stage: ``y [T, H] += sum_k w * (A_down[e] s_d + bias_down[e])`` (``s_d`` fp32 ``[P, rd]``)."""
    tokens, hidden = y.shape
    top_k = slot_pair.numel() // tokens
    bias = experts.bias_down is not None
    grid = (tokens, triton.cdiv(hidden, DEFAULT_BLOCK_C))
    _overlay_down_kernel[grid](s_d, slot_pair, slot_expert, pair_weight, experts.at_down,
                               experts.bias_down if bias else y, y, hidden, experts.at_down.shape[1],
                               TOP_K=top_k, HAS_BIAS=bias, BLOCK_C=DEFAULT_BLOCK_C)
