"""The engine's dense kernels against float64 SVD on fresh random inputs, odd sizes and edge values."""

import pytest
import torch

from lazarus_core.spectra import (energy_rank, factorize, gram, one_thread, singular_values, singular_values_reference,
                                  spectrum_and_factors)
from lazarus_core.spectra import openblas
from lazarus_core.spectra.linalg import GRAM_BLOCK, GRAM_CHUNK



@pytest.fixture(autouse=True, params=["openblas", "torch"])
def dense_backend(request, monkeypatch):
    """Every test on both float64 backends: numpy's OpenBLAS (dsyrk + numpy eigensolves) and torch's kernels."""
    if request.param == "openblas" and not openblas.usable():
        pytest.skip("numpy's OpenBLAS with a per-thread thread count is not in this numpy")
    if request.param == "torch":
        monkeypatch.setattr(openblas, "_library", lambda: None)
    return request.param


SHAPES = [(7, 13), (13, 7), (32, 32), (1, 5), (5, 1), (3, GRAM_CHUNK + 3), (GRAM_CHUNK + 3, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gram_spectrum_matches_float64_svd(shape):
    for delta in (torch.randn(shape), torch.randn(shape[0], 2) @ torch.randn(2, shape[1])):
        # Energies (what the ranks use) agree to float64 rounding of the Gram; a zero singular value comes
        # back as ~sqrt(eps) * sigma_1, i.e. an energy of ~eps * sigma_1^2.
        fast, ref = singular_values(delta).square(), singular_values_reference(delta).square()
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-12 * float(ref.sum()))


def test_gram_of_a_strided_view_is_the_smaller_side():
    base = torch.randn(40, 2 * GRAM_CHUNK + 7)
    delta = base[:, ::2]  # non-contiguous columns, [40, GRAM_CHUNK + 4]
    d = delta.double()
    torch.testing.assert_close(gram(delta), d @ d.T, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(gram(delta.T), d @ d.T, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("rows", [2 * GRAM_BLOCK - 1, 2 * GRAM_BLOCK, 3 * GRAM_BLOCK + 5])
def test_blocked_gram_equals_the_full_product(rows):
    # From 2 row blocks on only the blocks on and above the diagonal are multiplied; the rest are transposes.
    delta = torch.randn(rows, rows + GRAM_CHUNK + 9)
    d = delta.double()
    for g in (gram(delta), gram(delta.T)):  # wide, and tall (the same smaller side)
        torch.testing.assert_close(g, d @ d.T, rtol=1e-12, atol=1e-9)
        if rows >= 2 * GRAM_BLOCK:  # below the diagonal blocks: exactly the mirrored upper blocks
            assert torch.equal(torch.tril(g, -GRAM_BLOCK), torch.tril(g.T, -GRAM_BLOCK))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_factorize_is_the_truncated_svd(shape):
    delta = torch.randn(shape) * torch.rand(1, shape[1]) ** 2  # uneven spectrum, no ties
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    for rank in sorted({0, 1, min(shape) // 2, min(shape)}):
        a, b = factorize(delta, rank)
        assert a.shape == (shape[0], rank) and b.shape == (rank, shape[1]) and a.dtype == torch.float64
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(a @ b, best, rtol=0, atol=1e-9 * float(s[0]))


def test_factorize_rejects_a_rank_out_of_range():
    with pytest.raises(ValueError, match="rank must be in"):
        factorize(torch.randn(4, 6), 5)
    with pytest.raises(ValueError, match="rank must be in"):
        factorize(torch.randn(4, 6), -1)


def test_spectrum_and_factors_choose_the_rank_from_the_spectrum():
    delta = torch.randn(9, 3, dtype=torch.float64) @ torch.randn(3, 17, dtype=torch.float64)  # rank 3
    seen = []
    singular, a, b = spectrum_and_factors(delta, lambda sv: seen.append(sv.clone()) or int((sv > 1e-6 * sv[0]).sum()))
    torch.testing.assert_close(singular, seen[0])
    torch.testing.assert_close(singular, singular_values_reference(delta), rtol=1e-9, atol=1e-6)
    assert a.shape == (9, 3) and b.shape == (3, 17)
    # the Gram route resolves the dropped (zero) components to ~sqrt(eps) of the largest
    torch.testing.assert_close(a @ b, delta, rtol=0, atol=1e-7 * float(singular[0]))


def test_zero_delta():
    z = torch.zeros(6, 4)
    assert float(singular_values(z).abs().max()) == 0.0
    a, b = factorize(z, 2)
    assert float((a @ b).abs().max()) == 0.0
    assert energy_rank(singular_values(z), 0.95) == 0


def test_one_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), one_thread():
            raise KeyError("inside")
        assert torch.get_num_threads() == 2  # restored on an error too
    finally:
        torch.set_num_threads(before)


def test_energy_rank_edges():
    assert energy_rank(torch.zeros(5), 0.95) == 0
    assert energy_rank(torch.tensor([3.0, 0.0, 0.0]), 0.99) == 1
    s = torch.tensor([6.0, 4.0, 2.0, 1.0])  # energies 36, 16, 4, 1 of 57
    assert [energy_rank(s, f) for f in (0.5, 0.9, 0.95, 0.99, 1.0)] == [1, 2, 3, 4, 4]
    # exactly at the threshold: the lower rank
    assert energy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 2


def test_ranks_match_float64_svd_on_random_deltas():
    for _ in range(20):
        delta = torch.randn(24, 40) * torch.rand(1, 40) ** 3  # uneven spectrum
        fast, ref = singular_values(delta), singular_values_reference(delta)
        for f in (0.9, 0.95, 0.99):
            assert energy_rank(fast, f) == energy_rank(ref, f)
