"""overlay_moe_forward on every backend against its readable reference: fresh random overlays, odd token
counts, k in {1, 2, 4, 8}, ranks including 0 and 1, both activations, with and without expert biases."""

from __future__ import annotations

import pytest
import torch

from lazarus_core import BackendUnavailableError
from lazarus_core.ops import overlay_moe_forward, overlay_moe_forward_reference
from lazarus_core.ops import overlay_moe as op
from tests.overlay.random_overlay import random_overlay, random_routing

CPU_BACKENDS = ["torch", "cpu", "cpu_portable", "triton"]


def _run(backend, x, ids, w, ex):
    if backend == "cpu_portable":  # the host twin of the CUDA arithmetic
        impls = dict(op._IMPLS)
        try:
            op._IMPLS["cpu"] = (op._shrink_blas, lambda *a: op._gate_up_cpu(*a, portable=True),
                                lambda *a: op._down_cpu(*a, portable=True))
            return overlay_moe_forward(x, ids, w, ex, backend="cpu")
        finally:
            op._IMPLS.clear()
            op._IMPLS.update(impls)
    return overlay_moe_forward(x, ids, w, ex, backend=backend)


def _tolerance(ref: torch.Tensor) -> float:
    return 2e-5 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tokens,top_k,ranks", [(1, 1, (1, 1, 1)), (7, 2, (3, 5, 2)), (13, 4, (0, 0, 0)),
                                                (5, 8, (4, 1, 0))], ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gpt_oss", True)], ids=["swiglu", "gpt_oss+bias"])
def test_matches_reference(backend, tokens, top_k, ranks, activation, bias):
    ex = random_overlay(9, 37, 21, ranks, bias=bias, activation=activation)
    x = torch.randn(tokens, 37) * 2
    ids, w = random_routing(tokens, 9, top_k)
    ref = overlay_moe_forward_reference(x, ids, w, ex)
    out = _run(backend, x, ids, w, ex)
    assert out.shape == ref.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, atol=_tolerance(ref), rtol=1e-4)


def test_reference_equals_full_weights():
    # The reference never forms W_e; check it against the dense expert MLP on reconstructed weights.
    ex = random_overlay(5, 19, 11, (2, 3, 4), bias=True, activation="gpt_oss")
    x = torch.randn(6, 19)
    ids, w = random_routing(6, 5, 3)
    wg, wu, wd = (ex.reconstruct(p) for p in ("gate", "up", "down"))
    expected = torch.zeros(6, 19)
    for t in range(6):
        for k in range(3):
            e = int(ids[t, k])
            g, u = wg[e] @ x[t] + ex.bias_gate[e], wu[e] @ x[t] + ex.bias_up[e]
            g, u = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
            h = g * torch.sigmoid(1.702 * g) * (u + 1)
            expected[t] += w[t, k] * (wd[e] @ h + ex.bias_down[e])
    torch.testing.assert_close(overlay_moe_forward_reference(x, ids, w, ex), expected, atol=1e-4, rtol=1e-4)


def test_gpt_oss_clamp_edges_and_repeated_expert():
    # Large inputs drive gate/up past the clamp limit; one expert chosen by every token (a long group).
    ex = random_overlay(3, 33, 17, (2, 2, 2), bias=True, activation="gpt_oss", scale=2.0)
    x = torch.randn(11, 33) * 10
    ids = torch.tensor([[1, 0]] * 11)
    w = torch.rand(11, 2)
    ref = overlay_moe_forward_reference(x, ids, w, ex)
    for backend in ("cpu", "torch", "triton"):
        torch.testing.assert_close(_run(backend, x, ids, w, ex), ref, atol=_tolerance(ref), rtol=1e-4)


def test_zero_tokens_and_bf16_input():
    ex = random_overlay(4, 16, 8, (1, 1, 1), bias=False, activation="swiglu")
    out = overlay_moe_forward(torch.empty(0, 16), torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2), ex)
    assert out.shape == (0, 16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    ids, w = random_routing(3, 4, 2)
    out = overlay_moe_forward(x, ids, w, ex, backend="cpu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), overlay_moe_forward_reference(x.float(), ids, w, ex), atol=0.05, rtol=0.02)


def test_bad_inputs_name_the_argument():
    ex = random_overlay(4, 16, 8, (1, 1, 1), bias=False, activation="swiglu")
    x = torch.randn(3, 16)
    ids, w = random_routing(3, 4, 2)
    with pytest.raises(ValueError, match="x must be"):
        overlay_moe_forward(torch.randn(3, 15), ids, w, ex)
    with pytest.raises(ValueError, match="topk_ids must be in"):
        overlay_moe_forward(x, ids + 4, w, ex)
    with pytest.raises(ValueError, match="topk_weights"):
        overlay_moe_forward(x, ids, w[:, :1], ex)
    with pytest.raises(TypeError, match="topk_ids must be an integer"):
        overlay_moe_forward(x, ids.float(), w, ex)
    with pytest.raises(ValueError, match="backend must be one of"):
        overlay_moe_forward(x, ids, w, ex, backend="nope")
    with pytest.raises(ValueError, match="up.A has shape"):
        op.OverlayExperts.from_factors({"gate": torch.zeros(8, 16), "up": torch.zeros(8, 16), "down": torch.zeros(16, 8)},
                                       {"gate": torch.zeros(4, 8, 1), "up": torch.zeros(4, 9, 1), "down": torch.zeros(4, 16, 1)},
                                       {"gate": torch.zeros(4, 1, 16), "up": torch.zeros(4, 1, 16), "down": torch.zeros(4, 1, 8)})


def test_cpu_binding_rejects_bad_offsets():
    from lazarus_core.ops._backends import cpu_extension

    ext = cpu_extension()
    ex = random_overlay(2, 8, 4, (1, 1, 1), bias=False, activation="swiglu")
    gu0, s = torch.zeros(1, 8), torch.zeros(1, 2)
    h, hw = torch.zeros(1, 4), torch.zeros(1, 4)
    bad_offsets = torch.tensor([0, 2, 1], dtype=torch.int64)
    with pytest.raises(ValueError, match="offsets"):
        ext.overlay_gate_up(gu0.numpy(), s.numpy(), torch.zeros(1, dtype=torch.int64).numpy(), torch.ones(1).numpy(),
                            bad_offsets.numpy(), ex.at_gate.numpy(), ex.at_up.numpy(), None, None, 0, 1.0, 7.0,
                            h.numpy(), hw.numpy())
    with pytest.raises(ValueError, match="pair_token"):
        ext.overlay_gate_up(gu0.numpy(), s.numpy(), torch.tensor([5]).numpy(), torch.ones(1).numpy(),
                            torch.tensor([0, 1, 1]).numpy(), ex.at_gate.numpy(), ex.at_up.numpy(), None, None, 0, 1.0,
                            7.0, h.numpy(), hw.numpy())


def test_cuda_backend_unavailable_here_is_explicit():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    ex = random_overlay(2, 8, 4, (1, 1, 1), bias=False, activation="swiglu")
    ids, w = random_routing(1, 2, 1)
    with pytest.raises((BackendUnavailableError, ValueError)):
        overlay_moe_forward(torch.randn(1, 8), ids, w, ex, backend="cuda")
