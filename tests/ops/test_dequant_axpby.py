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
    expected = dequant_axpby_reference(w, y, alpha=alpha, beta=beta)
    actual = dequant_axpby(w, y, alpha=alpha, beta=beta, backend=backend)
    if backend == "cpu" and dtype != torch.bfloat16:
        # fp16/fp32 sources go through torch.add(alpha=...), which may fuse into one FMA rounding.
        torch.testing.assert_close(actual, expected, rtol=2.5e-7, atol=2.5e-7)
    else:
        _exact(actual, expected)


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
