"""mxfp4_quantize on every backend that runs here, against a brute-force float64 oracle."""

import numpy as np
import pytest
import torch

from lazarus_core.ops import mxfp4_dequant, mxfp4_quantize, mxfp4_quantize_reference

from .mxfp4_oracle import GRID, assert_same_floats, decode_f64, quantize_f64

BACKENDS = ["cpu", "torch", "triton"]


def _random_weights(shape):
    # Per-row magnitudes spanning many binades, so blocks exercise many scale bytes.
    return torch.randn(shape) * torch.exp2(torch.randint(-20, 20, (*shape[:-1], 1)).float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(32,), (3, 64), (5, 7, 96), (1, 1, 32)], ids=str)
def test_matches_bruteforce_oracle(backend, shape):
    w = _random_weights(shape)
    blocks, scales = mxfp4_quantize(w, backend=backend)
    ref_blocks, ref_scales = quantize_f64(w.numpy())
    assert blocks.shape == (*shape[:-1], shape[-1] // 32, 16) and scales.shape == (*shape[:-1], shape[-1] // 32)
    np.testing.assert_array_equal(scales.numpy(), ref_scales)
    np.testing.assert_array_equal(blocks.numpy(), ref_blocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_round_to_even_and_saturation(backend):
    # With amax = 6 the scale is 2^0, so these values sit exactly on midpoints of the E2M1 grid.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = torch.zeros(32)
    row[0] = 6.0
    row[1 : 1 + len(ties)] = torch.tensor(ties)
    row[10 : 10 + len(ties)] = -torch.tensor(ties)
    out = mxfp4_dequant(*mxfp4_quantize(row, backend=backend))
    assert out[1 : 1 + len(ties)].tolist() == expected
    assert out[10 : 10 + len(ties)].tolist() == [-v for v in expected]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_never_clips(backend):
    # amax just above 6 * 2^k must move to the next scale instead of clipping to 6 * 2^k.
    for k in (-3, 0, 5):
        w = torch.zeros(32)
        w[0] = float(np.nextafter(np.float32(6.0 * 2.0**k), np.float32(np.inf)))
        blocks, scales = mxfp4_quantize(w, backend=backend)
        assert scales.item() == 127 + k + 1
        assert mxfp4_dequant(blocks, scales)[0].item() == 3.0 * 2.0 ** (k + 1)  # nearest grid value on the larger scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_blocks_and_signed_zero(backend):
    w = torch.zeros(2, 32)
    w[0, 3] = -0.0
    blocks, scales = mxfp4_quantize(w, backend=backend)
    assert scales.tolist() == [[0], [0]]
    assert (blocks & 0x77).eq(0).all()  # no magnitude bits set
    out = mxfp4_dequant(blocks, scales)
    assert torch.signbit(out[0, 3]) and not torch.signbit(out[0, 2]) and out.abs().sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_and_huge_blocks(backend):
    w = torch.zeros(3, 32)
    w[0, 0] = 1e-40  # subnormal: scale clamps to 2^-127
    w[1, 0] = 3e38  # near the fp32 maximum: scale 2^126
    w[2, :] = torch.linspace(-1e-38, 1e-38, 32)
    blocks, scales = mxfp4_quantize(w, backend=backend)
    ref_blocks, ref_scales = quantize_f64(w.numpy())
    np.testing.assert_array_equal(scales.numpy(), ref_scales)
    np.testing.assert_array_equal(blocks.numpy(), ref_blocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_exact_for_representable_values(backend):
    codes = torch.randint(0, 256, (9, 4, 16), dtype=torch.uint8)
    scales = torch.randint(1, 254, (9, 4), dtype=torch.uint8)
    values = torch.from_numpy(decode_f64(codes.numpy(), scales.numpy())).float()
    values = values.nan_to_num(posinf=0.0, neginf=0.0)  # keep finite blocks only
    again = mxfp4_dequant(*mxfp4_quantize(values, backend=backend))
    assert_same_floats(again.abs(), values.abs())


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_error_bounded(backend):
    w = _random_weights((6, 128))
    blocks, scales = mxfp4_quantize(w, backend=backend)
    err = (mxfp4_dequant(blocks, scales) - w).abs().reshape(6, 4, 32)
    step = torch.exp2(scales.double() - 127).float()  # half of the widest grid gap (4 -> 6) is one scale unit
    assert (err <= step.unsqueeze(-1)).all()
    # And each value is the nearest grid point: no other grid value is strictly closer.
    scaled = (w.reshape(6, 4, 32) / step.unsqueeze(-1)).abs()
    grid = torch.from_numpy(GRID).float()
    nearest = (scaled.unsqueeze(-1) - grid).abs().min(-1).values
    assert torch.allclose(err / step.unsqueeze(-1), nearest, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_upcast(dtype):
    w = _random_weights((4, 64)).clamp(-1e4, 1e4).to(dtype)
    blocks, scales = mxfp4_quantize(w)
    ref_blocks, ref_scales = mxfp4_quantize_reference(w.float())
    assert torch.equal(blocks, ref_blocks) and torch.equal(scales, ref_scales)


def test_empty():
    blocks, scales = mxfp4_quantize(torch.zeros(0, 64))
    assert blocks.shape == (0, 2, 16) and scales.shape == (0, 2)


@pytest.mark.parametrize(
    "w,error,match",
    [
        (torch.zeros(4, 33), ValueError, "multiple of 32"),
        (torch.tensor(1.0), ValueError, "multiple of 32"),
        (torch.zeros(4, 32, dtype=torch.int32), TypeError, "floating-point"),
        (torch.full((1, 32), float("nan")), ValueError, "NaN or Inf"),
        (torch.full((1, 32), float("inf")), ValueError, "NaN or Inf"),
    ],
    ids=["odd-last-axis", "scalar", "int-input", "nan", "inf"],
)
def test_bad_input(w, error, match):
    with pytest.raises(error, match=match):
        mxfp4_quantize(w)
