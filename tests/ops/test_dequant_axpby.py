"""dequant_axpby (fused decode + alpha*w + beta*y) on every backend that runs here vs its reference."""

import pytest
import torch

from lazarus_core.ops import dequant_axpby, dequant_axpby_reference

from .mxfp4_oracle import decode_f64

BACKENDS = ["cpu", "torch", "triton"]
CASES = [(1.0, 1.0), (1.0 / 7.0, 1.0), (1.0, -1.0), (-0.5, 2.5), (0.0, 1.0)]


def _mxfp4(shape):
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8)
    scales = torch.randint(118, 136, shape, dtype=torch.uint8)
    return blocks, scales


def _exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha,beta", CASES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 7, 2)], ids=str)
def test_mxfp4_source(backend, alpha, beta, shape):
    blocks, scales = _mxfp4(shape)
    y = torch.randn(*shape[:-1], shape[-1] * 32)
    expected = dequant_axpby_reference(blocks, y, scales=scales, alpha=alpha, beta=beta)
    _exact(dequant_axpby(blocks, y, scales=scales, alpha=alpha, beta=beta, backend=backend), expected)
    # And against the independent float64 decoder (one rounding per operation in fp32).
    decoded = torch.from_numpy(decode_f64(blocks.numpy(), scales.numpy())).float()
    _exact(expected, torch.tensor(alpha) * decoded + torch.tensor(beta) * y)


def test_portable_cpu_path_matches():
    import lazarus_core._C as C

    blocks, scales = _mxfp4((9, 5))
    y = torch.randn(9, 160)
    out = torch.empty_like(y)
    C.mxfp4_axpby_portable(blocks.reshape(-1, 16).numpy(), scales.reshape(-1).numpy(), 0.25, y.reshape(-1).numpy(), -3.0,
                           out.reshape(-1).numpy())
    _exact(out, dequant_axpby_reference(blocks, y, scales=scales, alpha=0.25, beta=-3.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("alpha,beta", CASES, ids=str)
def test_float_source(backend, dtype, alpha, beta):
    w = torch.randn(7, 13).to(dtype)
    y = torch.randn(7, 13)
    _exact(dequant_axpby(w, y, alpha=alpha, beta=beta, backend=backend),
           dequant_axpby_reference(w, y, alpha=alpha, beta=beta))


def _rounded_f64(decoded: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """alpha * w + beta * y with each operation done in float64 and rounded to fp32 (alpha, beta too).

    float64 holds every fp32 product exactly and double rounding of + and * through float64 is innocuous
    (53 >= 2 * 24 + 2), so this is fp32 arithmetic with one rounding per operation, independent of torch."""
    f32 = lambda v: v.to(torch.float32).to(torch.float64)  # noqa: E731
    a, b = f32(torch.tensor(alpha, dtype=torch.float64)), f32(torch.tensor(beta, dtype=torch.float64))
    return f32(f32(a * decoded.double()) + f32(b * y.double())).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["fp32", "fp16", "bf16", "mxfp4"])
def test_exact_at_one_seventh(backend, source):
    # alpha = 1/7 is inexact in fp32, so an FMA contraction of alpha * w + beta * y changes about 12% of the
    # results (the fp32/fp16 cpu path did before it rounded the product on its own).
    y = torch.randn(37, 96)
    if source == "mxfp4":
        blocks, scales = _mxfp4((37, 3))
        decoded = torch.from_numpy(decode_f64(blocks.numpy(), scales.numpy())).reshape(37, 96)
        out = dequant_axpby(blocks, y, scales=scales, alpha=1 / 7, beta=0.3, backend=backend)
    else:
        w = torch.randn(37, 96).to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[source])
        decoded = w.double()
        out = dequant_axpby(w, y, alpha=1 / 7, beta=0.3, backend=backend)
    _exact(out, _rounded_f64(decoded, y, 1 / 7, 0.3))
    fused = (torch.tensor(1 / 7, dtype=torch.float64).float().double() * decoded.double()
             + torch.tensor(0.3).double() * y.double()).float()          # one rounding (an FMA-like result)
    assert (fused != out).float().mean() > 0.01                              # the test can tell the two apart


def test_cuda_mxfp4_path_checks_alignment():
    # The CUDA kernel read y / wrote out as float2 with no check: a view at an odd float offset faulted. The
    # launcher now picks the float2 path only when both pointers are 8-byte aligned (a host function).
    C = pytest.importorskip("lazarus_core._C_cuda", reason="the CUDA extension was not built here")
    base = 0x7F0000000000
    assert C.mxfp4_axpby_vector_path(base, base + 8)
    assert not C.mxfp4_axpby_vector_path(base + 4, base + 8)
    assert not C.mxfp4_axpby_vector_path(base, base + 12)
    y = torch.zeros(65)[1:]                                   # the view a caller can pass: contiguous, offset 4
    assert not C.mxfp4_axpby_vector_path(y.data_ptr(), y.data_ptr())


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_running_mean(backend):
    experts = [torch.randn(6, 64).to(torch.bfloat16) for _ in range(5)]
    mean = torch.zeros(6, 64)
    for w in experts:
        dequant_axpby(w, mean, alpha=1.0 / len(experts), out=mean, backend=backend)
    torch.testing.assert_close(mean, torch.stack([w.float() for w in experts]).mean(0), rtol=1e-6, atol=1e-6)
    blocks, scales = _mxfp4((6, 2))
    acc = torch.ones(6, 64)
    dequant_axpby(blocks, acc, scales=scales, out=acc, backend=backend)
    _exact(acc, dequant_axpby_reference(blocks, torch.ones(6, 64), scales=scales))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scale_and_empty(backend):
    blocks, scales = _mxfp4((2, 2))
    scales[1, 0] = 0xFF
    out = dequant_axpby(blocks, torch.zeros(2, 64), scales=scales, backend=backend)
    assert torch.isnan(out[1, :32]).all() and not torch.isnan(out[0]).any() and not torch.isnan(out[1, 32:]).any()
    empty = dequant_axpby(torch.zeros(0, 5, dtype=torch.bfloat16), torch.zeros(0, 5), backend=backend)
    assert empty.shape == (0, 5)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"weight": torch.zeros(2, 3, dtype=torch.int32), "y": torch.zeros(2, 3)}, TypeError, "fp32, bf16 or fp16"),
        ({"weight": torch.zeros(2, 3), "y": torch.zeros(2, 3, dtype=torch.float64)}, TypeError, "y must be float32"),
        ({"weight": torch.zeros(2, 3), "y": torch.zeros(3, 2)}, ValueError, "decoded weight"),
        ({"weight": torch.zeros(2, 16, dtype=torch.uint8), "y": torch.zeros(64), "scales": torch.zeros(3, dtype=torch.uint8)},
         ValueError, "MXFP4 blocks"),
        ({"weight": torch.zeros(2, 3), "y": torch.zeros(2, 3), "out": torch.zeros(2, 3, dtype=torch.bfloat16)},
         ValueError, "out must be contiguous float32"),
        ({"weight": torch.zeros(2, 3), "y": torch.zeros(3, 2).t()}, ValueError, "y must be contiguous"),
    ],
    ids=["int-weight", "fp64-y", "shape", "mxfp4-shape", "out-dtype", "strided-y"],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        dequant_axpby(**kwargs)
