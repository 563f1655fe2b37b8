"""The overlay op's backward (through the factors, never forming W_e): float64 gradcheck on tiny overlays, the
kernels' backward against autograd through the readable reference in storage precision, and the activation
derivative against torch's own on both sides of every clamp."""

from __future__ import annotations

import pytest
import torch

from lazarus_core.ops.overlay_moe import activation_reference, overlay_moe_forward_reference
from lazarus_core.ops.overlay_moe_op import activation_backward, overlay_moe_backward, overlay_moe_op
from tests.overlay.random_overlay import random_overlay, random_routing


@pytest.mark.parametrize("activation,bias,ranks", [("swiglu", False, (2, 3, 1)), ("gpt_oss", True, (1, 0, 2))],
                         ids=["swiglu", "gpt_oss+bias"])
def test_gradcheck_float64(activation, bias, ranks):
    ex = random_overlay(5, 7, 6, ranks, bias=bias, activation=activation).to_float(torch.float64)
    ids, w = random_routing(4, 5, 3)
    ids[0, 1] = ids[1, 0]  # experts shared between tokens
    x = (torch.randn(4, 7, dtype=torch.float64) * 3).requires_grad_()
    w = w.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: overlay_moe_op(x, ids, w, ex), (x, w))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("base,factor_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                               ("mxfp4", torch.bfloat16)], ids=["fp32", "bf16", "mxfp4+bf16"])
def test_backward_matches_autograd_through_reference(backend, base, factor_dtype):
    # storage precision as loaded (bf16 factors and biases over a bf16 or MXFP4 base): H, I multiples of 32
    ex = random_overlay(6, 64, 32, (3, 2, 4), bias=True, activation="gpt_oss", factor_dtype=factor_dtype, base=base)
    ids, w = random_routing(9, 6, 2)
    x0, gy = torch.randn(9, 64) * 2, torch.randn(9, 64)
    x, wk = x0.clone().requires_grad_(), w.clone().requires_grad_()
    y = overlay_moe_op(x, ids, wk, ex, backend=backend)
    y.backward(gy)
    oracle = ex.to_float(torch.float64)  # the same stored values, exactly, in float64
    xr, wr = x0.double().requires_grad_(), w.double().requires_grad_()
    overlay_moe_forward_reference(xr, ids, wr, oracle).backward(gy.double())
    assert x.grad.dtype == torch.float32 and wk.grad.shape == (9, 2)
    torch.testing.assert_close(x.grad, xr.grad.float(), atol=1e-4 * float(xr.grad.abs().max()), rtol=1e-4)
    torch.testing.assert_close(wk.grad, wr.grad.float(), atol=1e-4 * float(wr.grad.abs().max()), rtol=1e-4)


def test_backward_zero_tokens_and_weights_only():
    ex = random_overlay(4, 9, 5, (1, 1, 1), bias=False, activation="swiglu")
    dx, dw = overlay_moe_backward(torch.zeros(0, 9), torch.zeros(0, 9), torch.zeros(0, 2, dtype=torch.long),
                                  torch.zeros(0, 2), ex)
    assert dx.shape == (0, 9) and dw.shape == (0, 2)
    ids, w = random_routing(3, 4, 2)
    w.requires_grad_()
    overlay_moe_op(torch.randn(3, 9), ids, w, ex).sum().backward()  # x needs no gradient: only w gets one
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["swiglu", "gpt_oss"])
def test_activation_backward_matches_torch(kind):
    g = torch.cat([torch.linspace(-12, 12, 97, dtype=torch.float64), torch.tensor([6.5, 7.5, -7.5])])
    u = torch.cat([torch.linspace(12, -12, 97, dtype=torch.float64), torch.tensor([-7.5, 7.5, 6.5])])
    assert (g > 7).any() and (u < -7).any() and (u > 7).any()  # every clamp side is hit
    gr, ur = g.clone().requires_grad_(), u.clone().requires_grad_()
    h_ref = activation_reference(gr, ur, kind)
    dg_ref, du_ref = torch.autograd.grad(h_ref.sum(), (gr, ur))
    h, dg, du = activation_backward(g, u, kind)
    torch.testing.assert_close(h, h_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du, du_ref, rtol=1e-12, atol=1e-12)


def test_experts_forward_needing_grad_never_replays_a_cuda_graph():
    from lazarus_core.overlay.load import overlay_experts_forward

    class AlwaysReplay:  # stands in for GraphCache on a GPU: every call would replay (no autograd history)
        replays = 0

        def applies(self, x):
            return True

        def run(self, forward, *args):
            AlwaysReplay.replays += 1
            return forward(*args).detach()

    module = torch.nn.Module()
    module._lazarus_overlay = random_overlay(4, 9, 5, (1, 2, 1), bias=False, activation="swiglu")
    module._lazarus_backend, module._lazarus_graphs = "cpu", AlwaysReplay()
    ids, w = random_routing(3, 4, 2)
    x = torch.randn(3, 9, requires_grad=True)
    overlay_experts_forward(module, x, ids, w).sum().backward()
    assert AlwaysReplay.replays == 0 and x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        overlay_experts_forward(module, x, ids, w)
    assert AlwaysReplay.replays == 1  # inference still replays


def test_overlay_moe_forward_called_directly_with_grad_goes_through_the_op():
    """The public forward on inputs that require grad returns a differentiable result (no numpy() error)."""
    from lazarus_core.ops.overlay_moe import overlay_moe_forward
    from lazarus_core.ops.overlay_moe_op import overlay_moe_op
    from tests.overlay.random_overlay import random_overlay

    torch.manual_seed(3)
    ex = random_overlay(5, 24, 16, (3, 2, 4), bias=True, activation="swiglu")
    x = torch.randn(7, 24, requires_grad=True)
    ids = torch.randint(0, 5, (7, 2))
    w = torch.rand(7, 2, requires_grad=True)
    y = overlay_moe_forward(x, ids, w, ex, backend="cpu")
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = overlay_moe_op(x2, ids, w2, ex, backend="cpu")
    rx, rw = torch.autograd.grad(ref.square().sum(), (x2, w2))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    with torch.no_grad():
        torch.testing.assert_close(overlay_moe_forward(x, ids, w, ex, backend="cpu"), ref.detach())
