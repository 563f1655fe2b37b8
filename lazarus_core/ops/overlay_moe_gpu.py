"""GPU implementations (cuda, triton) of the overlay MoE forward; :func:`overlay_moe_forward` dispatches here.

The CPU ("cpu") and reference ("torch") paths stay in :mod:`lazarus_core.ops.overlay_moe`.
"""

from __future__ import annotations

import torch

from lazarus_core.ops._backends import cuda_extension, triton_module
from lazarus_core.ops.overlay_moe import ACTIVATIONS, OverlayExperts, _Routing, _routing


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _shrink_cuda(inp: torch.Tensor, rows: torch.Tensor | None, factors: torch.Tensor, routing: _Routing) -> torch.Tensor:
    out = torch.empty(routing.pair_expert.numel(), factors.shape[1], dtype=torch.float32, device=inp.device)
    with torch.cuda.device(inp.device):
        cuda_extension().overlay_shrink(inp.data_ptr(), _ptr(rows), routing.pair_expert.data_ptr(), factors.data_ptr(),
                                        out.data_ptr(), out.shape[0], inp.shape[1], out.shape[1],
                                        torch.cuda.current_stream(inp.device).cuda_stream)
    return out


def _shrink_triton(inp: torch.Tensor, rows: torch.Tensor | None, factors: torch.Tensor, routing: _Routing) -> torch.Tensor:
    out = torch.empty(routing.pair_expert.numel(), factors.shape[1], dtype=torch.float32, device=inp.device)
    triton_module(inp.device).overlay_shrink_triton(inp, rows, routing.pair_expert, factors, out)
    return out


def _gate_up_cuda(gu0, s_gu, r: _Routing, ex: OverlayExperts, h, hw):
    ext = cuda_extension()
    with torch.cuda.device(gu0.device):
        stream = torch.cuda.current_stream(gu0.device).cuda_stream
        ext.overlay_gate_up(gu0.data_ptr(), s_gu.data_ptr(), r.pair_token.data_ptr(), r.pair_weight.data_ptr(),
                            _ptr(r.offsets), ex.at_gate.data_ptr(), ex.at_up.data_ptr(), _ptr(ex.bias_gate),
                            _ptr(ex.bias_up), ACTIVATIONS[ex.activation], ex.alpha, ex.limit, h.data_ptr(),
                            hw.data_ptr(), r.slot_pair.data_ptr(), r.slot_expert.data_ptr(), hw.shape[0],
                            ex.intermediate_size, ex.num_experts, ex.at_gate.shape[1], ex.at_up.shape[1],
                            r.slot_pair.numel() // max(hw.shape[0], 1), stream)


def _down_cuda(s_d, r: _Routing, ex: OverlayExperts, y):
    ext = cuda_extension()
    with torch.cuda.device(y.device):
        stream = torch.cuda.current_stream(y.device).cuda_stream
        ext.overlay_down(s_d.data_ptr(), r.pair_token.data_ptr(), r.pair_weight.data_ptr(), _ptr(r.offsets),
                         ex.at_down.data_ptr(), _ptr(ex.bias_down), y.data_ptr(), r.slot_pair.data_ptr(),
                         r.slot_expert.data_ptr(), y.shape[0], ex.hidden_size, ex.num_experts, ex.at_down.shape[1],
                         r.slot_pair.numel() // max(y.shape[0], 1), stream)


def _gate_up_triton(gu0, s_gu, r: _Routing, ex: OverlayExperts, h, hw):
    triton_module(gu0.device).overlay_gate_up_triton(gu0, s_gu, r.slot_pair, r.slot_expert, r.pair_weight, ex, h, hw)


def _down_triton(s_d, r: _Routing, ex: OverlayExperts, y):
    triton_module(y.device).overlay_down_triton(s_d, r.slot_pair, r.slot_expert, r.pair_weight, ex, y)


# backend -> (grouped shrink, fused gate/up stage, fused down stage)
_IMPLS = {
    "cuda": (_shrink_cuda, _gate_up_cuda, _down_cuda),
    "triton": (_shrink_triton, _gate_up_triton, _down_triton),
}


def overlay_moe_forward_gpu(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                            experts: OverlayExperts, backend: str) -> torch.Tensor:
    """Overlay MoE forward on the cuda or triton kernels (inputs already checked by the caller).

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` hidden states (any float dtype).
    topk_ids, topk_weights : torch.Tensor
        ``[T, K]`` expert ids in ``[0, E)`` and routing weights.
    experts : OverlayExperts
        On ``x``'s device.
    backend : {"cuda", "triton"}

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in ``x.dtype``.
    """
    if backend not in _IMPLS:
        raise ValueError(f"overlay_moe_forward_gpu: backend must be 'cuda' or 'triton', got {backend!r}")
    shrink, gate_up, down = _IMPLS[backend]
    t, i = x.shape[0], experts.intermediate_size
    xf = x.to(torch.float32).contiguous()
    if t == 0:
        return torch.zeros_like(x)
    r = _routing(topk_ids, topk_weights, experts.num_experts, sort=False)
    gu0 = xf @ experts.base_gate_up.T                                    # [T, 2I]  cuBLAS, once per token
    s_gu = shrink(xf, r.pair_token, experts.b_gate_up, r)                # [P, rg+ru] grouped shrink
    h = torch.empty(r.pair_token.numel(), i, dtype=torch.float32, device=x.device)
    hw = torch.empty(t, i, dtype=torch.float32, device=x.device)
    gate_up(gu0, s_gu, r, experts, h, hw)                                # fused expand + bias + act + weighted sum
    s_d = shrink(h, None, experts.b_down, r)                             # [P, rd]
    y = hw @ experts.base_down.T                                         # [T, H] cuBLAS on the weighted sum
    down(s_d, r, experts, y)                                             # fused expand + bias + weighted sum
    return y.to(x.dtype)
