"""Independent float64 MXFP4 oracle for the tests, written from the OCP definition (numpy only)."""

import numpy as np
import torch

GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def decode_f64(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 [..., G, 16], uint8 [..., G] -> float64 [..., G*32] from sign/exponent/mantissa fields."""
    b = blocks.astype(np.int64)
    codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], 32)
    sign = np.where(codes & 8, -1.0, 1.0)
    exponent = (codes >> 1) & 3
    mantissa = codes & 1
    magnitude = np.where(exponent == 0, 0.5 * mantissa, np.exp2(exponent - 1.0) * (1.0 + 0.5 * mantissa))
    scale = np.where(scales == 0xFF, np.nan, np.exp2(scales.astype(np.float64) - 127.0))
    values = sign * magnitude * scale[..., None]
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * 32)


def quantize_f64(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: smallest non-clipping power-of-two scale, then the nearest grid value (ties -> even code)."""
    x = w.astype(np.float64).reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    flat = x.reshape(-1, 32)
    blocks = np.zeros((flat.shape[0], 16), dtype=np.uint8)
    scales = np.zeros(flat.shape[0], dtype=np.uint8)
    for i, row in enumerate(flat):
        amax = np.abs(row).max()
        e = -127
        while e < 127 and amax > 6.0 * 2.0**e:
            e += 1
        codes = []
        for v in row / 2.0**e:
            dist = np.abs(GRID - abs(v))
            best = np.flatnonzero(dist == dist.min())
            mag = best[0] if len(best) == 1 else [c for c in best if c % 2 == 0][0]
            codes.append(int(mag) | (8 if np.signbit(v) else 0))
        blocks[i] = [codes[2 * j] | (codes[2 * j + 1] << 4) for j in range(16)]
        scales[i] = e + 127
    return blocks.reshape(*x.shape[:-1], 16), scales.reshape(x.shape[:-1])


def assert_same_floats(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-exact comparison (signed zeros included) with NaN positions matching."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"NaN positions differ at {torch.nonzero(nan_a != nan_e)[:5].tolist()}"
    int_dtype = torch.int32 if actual.dtype == torch.float32 else torch.int16
    a = actual.view(int_dtype)[~nan_a]
    e = expected.view(int_dtype)[~nan_e]
    mismatch = torch.nonzero(a != e)
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} values differ; first: {actual[~nan_a][mismatch[:3, 0]].tolist()} "
        f"vs {expected[~nan_e][mismatch[:3, 0]].tolist()}"
    )
