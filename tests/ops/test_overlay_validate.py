"""validate_overlay_experts: every layout defect an OverlayExperts can carry is refused when it is built, with
a message naming the field; a valid layout is checked once, not on every forward call."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lazarus_core.ops import overlay_validate
from lazarus_core.ops.overlay_moe import OverlayExperts
from lazarus_core.ops.overlay_validate import validate_overlay_experts
from tests.overlay.random_overlay import random_overlay, random_routing

E, H, I = 5, 64, 32  # noqa: E741  (multiples of 32: the MXFP4 base fits too)


def _float_layer(**kw) -> OverlayExperts:
    return random_overlay(E, H, I, (2, 3, 1), bias=True, activation="gpt_oss", **kw)


def _mxfp4_layer() -> OverlayExperts:
    return random_overlay(E, H, I, (2, 0, 3), bias=False, activation="swiglu", factor_dtype=torch.bfloat16,
                          base="mxfp4")


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    out = torch.stack([t, t], -1)[..., 0]  # same values and shape, stride 2 on the last axis
    assert not out.is_contiguous() and out.shape == t.shape
    return out


def test_valid_layouts_pass():
    for ex in (_float_layer(), _mxfp4_layer(), _float_layer().to_float(torch.float64)):
        validate_overlay_experts(ex)
    ex = _mxfp4_layer()
    assert ex.base_format == "mxfp4" and ex.hidden_size == H and ex.intermediate_size == I


@pytest.mark.parametrize("layer,field,make,error,words", [
    ("float", "at_up", lambda ex: ex.at_up[:, :, :-1].contiguous(), ValueError, "expected [E, ru, I]"),
    ("float", "base_down", lambda ex: ex.base_down[:-1].contiguous(), ValueError, "expected [H, I]"),
    ("float", "b_gate_up", lambda ex: ex.b_gate_up[:, :-1].contiguous(), ValueError, "[E, rg+ru, H]"),
    ("float", "bias_down", lambda ex: ex.bias_down[:, :-1].contiguous(), ValueError, "expected [E, H]"),
    ("float", "at_gate", lambda ex: ex.at_gate.to(torch.int32), TypeError, "dtype torch.int32"),
    ("float", "at_down", lambda ex: ex.at_down.to(torch.bfloat16), TypeError, "share one dtype"),
    ("float", "bias_up", lambda ex: ex.bias_up.to(torch.float16), TypeError, "dtype torch.float16"),
    ("float", "base_gate_up", lambda ex: ex.base_gate_up.to(torch.uint8), TypeError, "dtype torch.uint8"),
    ("float", "b_down", lambda ex: _non_contiguous(ex.b_down), ValueError, "must be contiguous"),
    ("float", "base_gate_up", lambda ex: _non_contiguous(ex.base_gate_up), ValueError, "must be contiguous"),
    ("float", "bias_up", lambda ex: ex.bias_up.to("meta"), ValueError, "one device"),
    ("float", "at_down", lambda ex: ex.at_down.to("meta"), ValueError, "one device"),
    ("float", "at_down", lambda ex: ex.at_down[:-1].contiguous(), ValueError, "E = 4 experts"),
    ("float", "bias_gate", lambda ex: ex.bias_gate[:-1].contiguous(), ValueError, "expected [E, I]"),
    ("float", "at_up", lambda ex: ex.at_up[0], ValueError, "must be 3-D"),
    ("float", "at_gate", lambda ex: ex.at_gate.numpy(), TypeError, "must be a torch.Tensor"),
    ("float", "base_down", lambda ex: None, ValueError, "missing"),
    ("mxfp4", "base_gate_up_scales", lambda ex: ex.base_gate_up_scales[:, :-1].contiguous(), ValueError, "[2I, H/32]"),
    ("mxfp4", "base_down_blocks", lambda ex: ex.base_down_blocks[..., :8].contiguous(), ValueError, "[H, I/32, 16]"),
    ("mxfp4", "base_down_scales", lambda ex: ex.base_down_scales.to(torch.int8), TypeError, "dtype torch.int8"),
    ("mxfp4", "base_gate_up_blocks", lambda ex: None, ValueError, "missing"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_layout_defect_names_the_field(layer, field, make, error, words):
    ex = _float_layer() if layer == "float" else _mxfp4_layer()
    with pytest.raises(error, match=rf"OverlayExperts\.{field}\b") as info:
        dataclasses.replace(ex, **{field: make(ex)})
    assert words in str(info.value)


def test_base_format_conflicts_and_mxfp4_block_size():
    ex, mx = _float_layer(), _mxfp4_layer()
    with pytest.raises(ValueError, match="both a float base and an MXFP4 base"):
        dataclasses.replace(mx, base_down=ex.base_down)
    odd = random_overlay(3, 40, 32, (1, 1, 1), bias=False, activation="swiglu")  # H = 40: no whole MXFP4 blocks
    blocks = torch.zeros(64, 1, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="H = 40 is not a multiple of 32"):
        dataclasses.replace(odd, base_gate_up=None, base_down=None, base_gate_up_blocks=blocks,
                            base_gate_up_scales=blocks[..., 0].contiguous(), base_down_blocks=blocks,
                            base_down_scales=blocks[..., 0].contiguous())


@pytest.mark.parametrize("field,value", [("alpha", float("nan")), ("limit", "7"), ("activation", "gelu")])
def test_bad_scalars_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(_float_layer(), **{field: value})


def test_checked_once_not_per_forward_call(monkeypatch):
    from lazarus_core.ops.overlay_moe_op import overlay_moe_op

    checks = []
    original = overlay_validate._check
    monkeypatch.setattr(overlay_validate, "_check", lambda *a, **k: (checks.append(a[0]), original(*a, **k))[1])
    ex = random_overlay(E, H, I, (2, 3, 1), bias=False, activation="swiglu")  # fp32: the kernels' own dtype
    built = len(checks)
    assert built >= 7  # five factors and two bases, checked when the layer was built
    ids, w = random_routing(4, E, 2)
    for _ in range(3):  # x requires grad: through the custom op, which rebuilds the layer from its tensors
        overlay_moe_op(torch.randn(4, H, requires_grad=True), ids, w, ex, backend="cpu").sum().backward()
    assert len(checks) == built  # forward and backward rebuilt it from the same tensors: recognised, not rechecked
    with pytest.raises(ValueError, match=r"OverlayExperts\.at_up"):  # a replaced tensor is new: checked again
        dataclasses.replace(ex, at_up=ex.at_up[:, :, :-1].contiguous())
