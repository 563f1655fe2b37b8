"""The integer MXFP4 GEMM of many token rows (csrc/overlay_moe/mxfp4_gemm_cpu.cpp) against its rounding oracle."""

from __future__ import annotations

import pytest
import torch

from lazarus_core.ops import overlay_moe as op
from tests.overlay.test_overlay_moe_op import _mxfp4_weight, assert_rounding_oracle

EXT = op.cpu_extension()
HAS_AVX512_VNNI = EXT.cpu_has_avx512_vnni()
needs_avx2 = pytest.mark.skipif(not EXT.cpu_has_avx2(), reason="this CPU has no AVX2: products of many rows decode "
                                "fp32 tiles (tested in test_overlay_moe_op)")
needs_avx512_vnni = pytest.mark.skipif(not HAS_AVX512_VNNI, reason="this CPU has no AVX-512 VNNI: only the AVX2 "
                                       "form of the GEMM runs")
# The GEMM's forms this CPU runs: AVX2, and the zmm one where the CPU has AVX-512 VNNI.
FORMS = ["avx2"] + (["avx512_vnni"] if HAS_AVX512_VNNI else [])


def _matmul(form: str, x: torch.Tensor, *, blocks: torch.Tensor, scales: torch.Tensor,
            mxfp4_tokens: str = "int16") -> torch.Tensor:
    """The GEMM itself in one form: the extension's call, which stored_matmul makes where _integer_gemm says."""
    y = torch.full((x.shape[0], blocks.shape[0]), float("nan"))
    with op.cpu_avx512_vnni(form == "avx512_vnni"):
        done = EXT.mxfp4_gemm(blocks.numpy(), scales.numpy(), blocks.shape[0], blocks.shape[1] * 32,
                              x.contiguous().numpy(), y.numpy(), op._MXFP4_TOKEN_MODES[mxfp4_tokens])
    assert done
    return y


def _edge_rows(x: torch.Tensor) -> torch.Tensor:
    """Blocks far below the others, near fp32's bottom, and far from zero mean (the +12 code offset)."""
    x[:, :32] *= 1e-20
    if x.shape[1] >= 96:
        x[:, 64:96] = torch.randn(x.shape[0], 32) * 1e-38
    x[0, -32:] += 5.0
    x[-1, 32:64] = 0.0                   # an all-zero block (an empty slice at 32 columns)
    return x


@needs_avx2
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["int16", "int8"])
@pytest.mark.parametrize("n,rows,cols", [(17, 21, 160), (37, 33, 352), (20, 70, 2880), (261, 47, 96),
                                         (18, 16, 32), (23, 5, 288)])
def test_gemm_equals_its_rounding_reference(form, mode, n, rows, cols):
    # Products and block sums are exact in integers: the GEMM equals the fp64 product of the rounded rows up to
    # the fp32 sum over blocks. Sizes: a token tail of 1-3 after tiles of 4, rows not a multiple of the 32-row
    # panel (masked stores), fewer rows than one 8- or 16-row vector, one block, more tokens than one pass (256). A
    # weight row with a NaN scale and one with a zero scale byte run the fp32 kernel on the unrounded rows.
    kw = _mxfp4_weight(rows, cols, seed=n + rows)
    kw["scales"][3, 0] = 0xFF
    kw["scales"][4, -1] = 0
    g = torch.Generator().manual_seed(n * cols)
    x = _edge_rows(torch.randn(n, cols, generator=g) * 3)
    assert n > op.GEMV_MAX_ROWS  # the GEMM's side of the crossover
    out, oracle, exact, scale = assert_rounding_oracle(_matmul(form, x, **kw, mxfp4_tokens=mode), x, kw, mode)
    # The rounding is real: where the rounded rows' product differs visibly from the exact one (every case but
    # the one-block weight, whose small blocks round exactly), the GEMM follows the rounded one.
    if cols > 32:
        gap = float((oracle - exact).abs().max())
        assert gap > 1e-5 * scale and float((out - exact).abs().max()) >= 0.5 * gap


@needs_avx2
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["int16", "int8"])
def test_gemm_rows_match_the_matrix_vector_kernel(form, mode):
    # The same rounded integers as the matrix-vector kernel: each token row of a many-row product equals the
    # one-row product up to the order of the fp32 sum over blocks, on fresh draws over several magnitudes.
    g = torch.Generator().manual_seed(5)
    kw = _mxfp4_weight(45, 800, seed=9)
    x = torch.randn(19, 800, generator=g) * torch.logspace(-4, 4, 19)[:, None]
    many = _matmul(form, x, **kw, mxfp4_tokens=mode)
    for i in range(x.shape[0]):
        one = op.stored_matmul(x[i:i + 1], **kw, mxfp4_tokens=mode)[0]
        torch.testing.assert_close(many[i], one, rtol=0, atol=2e-6 * float(one.abs().max()))


@needs_avx2
@pytest.mark.parametrize("form", FORMS)
def test_gemm_declines_rows_holding_inf_or_nan(form):
    # Like the matrix-vector kernel: an input row holding inf or NaN runs the exact fp32 path for the product
    # (NaN and inf propagate to that row only); the extension call reports that it wrote nothing, also when the
    # bad row sits in its second pass of 256 rows.
    kw = _mxfp4_weight(40, 96, seed=3)
    for n, bad in ((20, 7), (270, 265)):
        x = torch.randn(n, 96)
        x[2, 5] = float("nan")
        x[bad, 90] = float("inf")
        y = torch.full((n, 40), -1.0)
        with op.cpu_avx512_vnni(form == "avx512_vnni"):
            assert not EXT.mxfp4_gemm(kw["blocks"].numpy(), kw["scales"].numpy(), 40, 96, x.numpy(), y.numpy(), 1)
        assert (y == -1.0).all()
    out = op.stored_matmul(x, **kw)
    torch.testing.assert_close(out, op.stored_matmul(x, **kw, mxfp4_tokens="fp32"), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3]]).any()


@needs_avx2
def test_gemm_fp32_tokens_run_the_exact_tiles():
    kw = _mxfp4_weight(50, 320, seed=4)
    x = torch.randn(33, 320) * 2
    exact = op.stored_matmul(x, **kw, mxfp4_tokens="fp32")
    torch.testing.assert_close(exact, op.stored_matmul_reference(x, **kw), rtol=1e-5, atol=1e-5)
    for form in FORMS:
        assert not torch.equal(_matmul(form, x, **kw), exact)   # the rounded integer GEMM
    assert EXT.mxfp4_gemm(kw["blocks"].numpy(), kw["scales"].numpy(), 50, 320, x.numpy(),
                          torch.empty(33, 50).numpy(), 0) is False   # fp32 tokens are not the GEMM's


@needs_avx2
def test_many_row_products_run_the_gemm_where_it_pays():
    # int8 runs the GEMM from AVX2 on; int16 only in the AVX-512 VNNI form (with AVX2 alone its two products per
    # weight ran at fp32 BLAS's speed): forbidden, as on a CPU without it, int16 decodes the exact fp32 tiles.
    kw = _mxfp4_weight(50, 320, seed=6)
    x = torch.randn(33, 320) * 2
    exact = op.stored_matmul(x, **kw, mxfp4_tokens="fp32")
    with op.cpu_avx512_vnni(False):
        assert torch.equal(op.stored_matmul(x, **kw, mxfp4_tokens="int16"), exact)
        assert torch.equal(op.stored_matmul(x, **kw, mxfp4_tokens="int8"),
                           _matmul("avx2", x, **kw, mxfp4_tokens="int8"))
    if HAS_AVX512_VNNI:
        for mode in ("int16", "int8"):
            assert torch.equal(op.stored_matmul(x, **kw, mxfp4_tokens=mode),
                               _matmul("avx512_vnni", x, **kw, mxfp4_tokens=mode))


@needs_avx512_vnni
@pytest.mark.parametrize("mode", ["int16", "int8"])
def test_gemm_forms_give_the_same_bits(mode):
    # The same integers per (token, row, block) and the same fp32 FMAs in block order: the AVX2 form (vpmaddubsw +
    # vpmaddwd, 8-row vectors) equals the zmm one (vpdpbusd, 16-row vectors) bit for bit, tails and NaN included.
    g = torch.Generator().manual_seed(11)
    for n, rows, cols in ((19, 45, 800), (261, 37, 96), (30, 70, 2880)):
        kw = _mxfp4_weight(rows, cols, seed=rows)
        kw["scales"][2, 1] = 0xFF
        x = _edge_rows(torch.randn(n, cols, generator=g) * 2)
        ymm, zmm = _matmul("avx2", x, **kw, mxfp4_tokens=mode), _matmul("avx512_vnni", x, **kw, mxfp4_tokens=mode)
        assert ymm.isnan().any()                       # the 0xFF block's row: torch.equal would call NaN unequal
        assert torch.equal(ymm.view(torch.int32), zmm.view(torch.int32))   # bits, NaN included


def test_gemm_checks_its_arguments():
    kw = _mxfp4_weight(8, 64, seed=1)
    x = torch.randn(20, 64)
    with pytest.raises(ValueError, match="cols must be a multiple of 32"):
        EXT.mxfp4_gemm(kw["blocks"].numpy(), kw["scales"].numpy(), 8, 60, x.numpy(), torch.empty(20, 8).numpy(), 1)
    with pytest.raises(ValueError, match="y"):
        EXT.mxfp4_gemm(kw["blocks"].numpy(), kw["scales"].numpy(), 8, 64, x.numpy(), torch.empty(20, 7).numpy(), 1)
    with pytest.raises(ValueError, match="tokens"):
        EXT.mxfp4_gemm(kw["blocks"].numpy(), kw["scales"].numpy(), 8, 64, x.numpy(), torch.empty(20, 8).numpy(), 5)
