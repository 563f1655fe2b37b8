"""numpy's OpenBLAS backend of the spectra engine (dsyrk, eigensolves, per-thread thread count) against torch's
float64 kernels on fresh random inputs, odd sizes and edge values."""

import threading

import pytest
import torch

from lazarus_core.spectra import openblas
from lazarus_core.spectra.linalg import GRAM_CHUNK, gram, singular_values

pytestmark = pytest.mark.skipif(not openblas.usable(), reason="numpy's OpenBLAS with a per-thread thread count "
                                                              "is not in this numpy")


@pytest.mark.parametrize("n,k", [(1, 1), (5, 3), (37, 101), (300, 7), (513, 64)])
def test_syrk_accumulates_the_lower_triangle_only(n, k):
    g0 = torch.randn(n, n, dtype=torch.float64)
    g = g0.clone()
    buffer = torch.randn(n, k + 9, dtype=torch.float64)
    part = buffer[:, 4:4 + k]  # a column slice: row stride k + 9, like the engine's chunk buffer
    openblas.syrk_lower_(g, part)
    expected = g0 + part @ part.T
    torch.testing.assert_close(torch.tril(g), torch.tril(expected), rtol=1e-13, atol=1e-12)
    assert torch.equal(torch.triu(g, 1), torch.triu(g0, 1))  # the upper triangle is never written


def test_syrk_of_zero_columns_and_edge_values():
    g = torch.zeros(4, 4, dtype=torch.float64)
    openblas.syrk_lower_(g, torch.empty(4, 0, dtype=torch.float64))
    assert torch.equal(g, torch.zeros(4, 4, dtype=torch.float64))
    part = torch.tensor([[1e-300, 0.0], [1e150, -1e150], [float("inf"), 1.0], [float("nan"), 0.0]],
                        dtype=torch.float64)
    openblas.syrk_lower_(g, part)
    expected = part @ part.T
    low = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    torch.testing.assert_close(g[low], expected[low], equal_nan=True)


def test_syrk_rejects_bad_operands_by_name():
    g = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="part must be a row-major float64"):
        openblas.syrk_lower_(g, torch.zeros(3, 2))  # float32
    with pytest.raises(ValueError, match="part must be a row-major float64"):
        openblas.syrk_lower_(g, torch.zeros(2, 3, dtype=torch.float64).T)  # column stride 3
    with pytest.raises(ValueError, match="part has 4 rows, expected 3"):
        openblas.syrk_lower_(g, torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="g must be a contiguous float64"):
        openblas.syrk_lower_(torch.zeros(3, 3), torch.zeros(3, 2, dtype=torch.float64))


def _lower_only(n: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, rank or n + 3, dtype=torch.float64)
    full = x @ x.T
    garbage = torch.tril(full) + torch.triu(torch.full_like(full, 1e30), 1)  # the upper triangle must not be read
    return full, garbage


@pytest.mark.parametrize("n", [1, 2, 17, 64, 257])
def test_eigensolves_read_the_lower_triangle_and_match_torch(n, monkeypatch):
    full, lower = _lower_only(n)
    ref = torch.linalg.eigvalsh(full)
    scale = float(ref.abs().max())
    for eig_max in (openblas.EIG_MAX, 0):  # numpy's solver, then torch's (every n above EIG_MAX = 0)
        monkeypatch.setattr(openblas, "EIG_MAX", eig_max)
        assert openblas.uses_numpy_eig(n) == (eig_max > 0)
        values = openblas.eigvalsh(lower)
        assert values.dtype == torch.float64 and values.shape == (n,)
        torch.testing.assert_close(values, ref, rtol=0, atol=1e-12 * scale)
        w, v = openblas.eigh(lower)
        torch.testing.assert_close(w, ref, rtol=0, atol=1e-12 * scale)
        torch.testing.assert_close(v @ torch.diag(w) @ v.T, full, rtol=0, atol=1e-11 * scale)
        torch.testing.assert_close(v.T @ v, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_rank_deficient_and_zero_grams():
    full, lower = _lower_only(40, rank=3)
    values = openblas.eigvalsh(lower)
    assert (values[:-3].abs() < 1e-10 * values[-1]).all() and (values[-3:] > 0).all()
    assert torch.equal(openblas.eigvalsh(torch.zeros(6, 6, dtype=torch.float64)), torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="square float64 CPU matrix"):
        openblas.eigvalsh(torch.zeros(3, 4, dtype=torch.float64))


def test_thread_count_follows_torch_and_is_restored_per_thread():
    lib = openblas._library()
    seen = {}

    def worker(name: str, threads: int) -> None:
        lib.set_threads(5)  # this thread's own setting
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with openblas.torch_threads():
                seen[name] = lib.set_threads(threads)  # the count inside: torch's
            seen[name + " after"] = lib.set_threads(0)  # restored to this thread's 5
        finally:
            torch.set_num_threads(previous)

    t = threading.Thread(target=worker, args=("one", 1))
    t.start()
    t.join()
    assert seen == {"one": 1, "one after": 5}


def test_engine_on_openblas_equals_torch_kernels(monkeypatch):
    delta = torch.randn(300, 2 * GRAM_CHUNK + 11) * torch.rand(1, 2 * GRAM_CHUNK + 11)
    fast_gram, fast_sv = gram(delta), singular_values(delta)
    assert torch.equal(fast_gram, fast_gram.T)  # mirrored from the lower triangle
    monkeypatch.setattr(openblas, "_library", lambda: None)
    assert not openblas.usable()
    slow_gram, slow_sv = gram(delta), singular_values(delta)
    torch.testing.assert_close(fast_gram, slow_gram, rtol=1e-12, atol=1e-9)
    energy = float(slow_sv.square().sum())
    torch.testing.assert_close(fast_sv.square(), slow_sv.square(), rtol=1e-9, atol=1e-12 * energy)
