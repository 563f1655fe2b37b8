"""The overlay custom ops under torch.library.opcheck (schema, fake implementation, autograd registration, AOT
dispatch with dynamic shapes) and torch.compile(fullgraph=True); the generic flattening of OverlayExperts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lazarus_core.ops.overlay_moe_op import flatten_overlay, overlay_moe_op, unflatten_overlay
from tests.overlay.random_overlay import random_overlay, random_routing


def _layer(kind: str):
    if kind == "fp32":
        return random_overlay(5, 13, 7, (2, 3, 1), bias=True, activation="gpt_oss")
    return random_overlay(5, 32, 64, (1, 2, 3), bias=False, activation="swiglu", factor_dtype=torch.bfloat16,
                          base="mxfp4")


def test_flatten_round_trip():
    ex = _layer("mxfp4")
    tensors, spec = flatten_overlay(ex)
    assert len(tensors) == len(ex.tensors()) and "activation=sswiglu" in spec and "base_down=n" in spec
    back = unflatten_overlay(tensors, spec)
    for field in dataclasses.fields(ex):
        a, b = getattr(ex, field.name), getattr(back, field.name)
        assert (a is b) if isinstance(a, torch.Tensor) else a == b
    with pytest.raises(ValueError, match="spec names more tensors"):
        unflatten_overlay(tensors[:-1], spec)


@pytest.mark.parametrize("kind", ["fp32", "mxfp4"])
def test_opcheck(kind):
    ex = _layer(kind)
    tensors, spec = flatten_overlay(ex)
    ids, w = random_routing(6, 5, 2)
    x = torch.randn(6, ex.hidden_size, requires_grad=True)
    torch.library.opcheck(torch.ops.lazarus.overlay_moe.default, (x, ids, w.requires_grad_(), tensors, spec, "cpu", True))
    if kind == "fp32":  # the backward op's layout handling is the forward's (one unflatten)
        gy = torch.randn(6, ex.hidden_size)
        torch.library.opcheck(torch.ops.lazarus.overlay_moe_backward.default,
                              (gy, x.detach(), ids, w.detach(), tensors, spec))


def test_compile_fullgraph_forward_and_backward():
    ex = _layer("fp32")

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.overlay = ex

        def forward(self, x, ids, w):
            return overlay_moe_op(x, ids, w, self.overlay, backend="cpu", check_ids=False)

    ids, w = random_routing(7, 5, 3)
    x0, gy = torch.randn(7, 13), torch.randn(7, 13)
    grads = []
    for module in (Experts(), torch.compile(Experts(), fullgraph=True, backend="aot_eager")):
        x, wk = x0.clone().requires_grad_(), w.clone().requires_grad_()
        y = module(x, ids, wk)
        y.backward(gy)
        grads.append((y.detach(), x.grad, wk.grad))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)  # the same op runs in both
