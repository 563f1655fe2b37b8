"""Dense kernels of the spectra engine: the float64 Gram of an expert delta, its eigensolve, the singular
values, the best rank-r factors and the energy rank read from a spectrum.

Method, chosen by measurement on this CPU (2 cores; [1024, 2048] fp32 delta): ``torch.linalg.svdvals``
takes ~8 s, the Gram route ~0.5 s (float64 Gram GEMM 0.15 s + float64 symmetric eigensolver 0.33 s).
The Gram is formed in float64 so that ranks match a float64 SVD exactly: a float32 Gram perturbs the
energy curve by ~1e-6 of the total, enough to flip an occasional rank at a threshold. It is accumulated
over column chunks copied into ONE reused float64 buffer, so no float64 copy of the whole delta (4 fp32
experts' worth at [1024, 2048]) is ever allocated.

Where numpy's OpenBLAS is usable (:mod:`lazarus_core.spectra.openblas`; its table: 1.6x torch's MKL for the
Gram, 1.5x for a 1024-row eigensolve here) the Gram is its ``dsyrk`` over the same chunks (lower triangle
only) and eigensolves up to 1536 rows are numpy's; otherwise the Gram is the blocked GEMMs below and every
eigensolve torch's. The eigensolver runs on one thread: on this 2-core machine, with another process busy,
LAPACK's tridiagonalisation on 2 threads took 5.7 s for a 1024 x 1024 Gram against 0.17 s on one (idle:
about the same either way), because its threads spin-wait on each other.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from lazarus_core.spectra import openblas

GRAM_CHUNK = 512  # columns per float64 Gram update
# Row blocks of the Gram: only the blocks on and above the diagonal are multiplied (10 of 16 at 1024 rows, 62% of
# the flops of one full GEMM; measured 0.09 s against 0.14 s for a [1024, 2048] delta on one thread), the others
# are their transposes. Grams under 2 blocks are one GEMM.
GRAM_BLOCK = 256
# Below this many elements per matrix the whole per-expert pass runs on one thread: measured here (load 5),
# the spectrum of a 128 x 128 delta took 2.1 ms on one thread and 33 ms on two (thread hand-offs dominate).
SMALL_MATRIX = 1 << 18


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch thread (then restore the count).

    Small dense LAPACK calls (eigh/eigvalsh on Grams of a few hundred rows) are faster on one thread here,
    and with two threads on a busy 2-core machine they spin-wait for minutes.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def threads_for(shape: tuple[int, int]) -> contextlib.AbstractContextManager:
    """:func:`one_thread` for matrices under :data:`SMALL_MATRIX` elements, else a no-op context."""
    return one_thread() if shape[0] * shape[1] < SMALL_MATRIX else contextlib.nullcontext()


def _wide(delta: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``([small, large] view of delta, True if delta itself is wide)``; no copy."""
    wide = delta.shape[0] <= delta.shape[1]
    return (delta if wide else delta.T), wide


def _chunks(x: torch.Tensor, scratch: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, float64 copy of x[:, start:start + GRAM_CHUNK])`` through the reused ``scratch``."""
    for start in range(0, x.shape[1], GRAM_CHUNK):
        width = min(GRAM_CHUNK, x.shape[1] - start)
        part = scratch[:, :width]
        part.copy_(x[:, start:start + width])
        yield start, part


def _scratch(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[0], min(GRAM_CHUNK, x.shape[1]), dtype=torch.float64)


def gram(delta: torch.Tensor) -> torch.Tensor:
    """float64 Gram of the smaller side of ``delta``: ``delta @ delta.T`` if wide, else ``delta.T @ delta``.

    Parameters
    ----------
    delta : torch.Tensor
        ``[out, in]`` floating point (any strides).

    Returns
    -------
    torch.Tensor
        float64 ``[min(out, in), min(out, in)]``, symmetric positive semi-definite.
    """
    g = _gram_lower(delta)
    if openblas.usable():  # dsyrk filled the lower triangle only
        g.copy_(torch.tril(g) + torch.tril(g, -1).T)
    return g


def _gram_lower(delta: torch.Tensor) -> torch.Tensor:
    """float64 Gram of the smaller side of ``delta`` whose LOWER triangle (with the diagonal) is exact; the
    upper one is zero when numpy's OpenBLAS formed it (``dsyrk``), else the full symmetric matrix."""
    x, _ = _wide(delta)
    n = x.shape[0]
    g = torch.zeros(n, n, dtype=torch.float64)
    scratch = _scratch(x)
    if openblas.usable():
        for _, part in _chunks(x, scratch):
            openblas.syrk_lower_(g, part)
        return g
    starts = list(range(0, n, GRAM_BLOCK)) if n >= 2 * GRAM_BLOCK else [0]
    blocks = [slice(a, min(n, a + GRAM_BLOCK) if len(starts) > 1 else n) for a in starts]
    for _, part in _chunks(x, scratch):
        for i, rows in enumerate(blocks):  # the blocks on and above the diagonal only (a symmetric rank-k update)
            for cols in blocks[i:]:
                g[rows, cols].addmm_(part[rows], part[cols].T)
    for i, rows in enumerate(blocks):       # the lower blocks are the transposes of the upper ones
        for cols in blocks[i + 1:]:
            g[cols, rows].copy_(g[rows, cols].T)
    return g


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of ``delta`` through the smaller Gram matrix and ``eigvalsh``.

    Parameters
    ----------
    delta : torch.Tensor
        ``[out, in]`` floating point.

    Returns
    -------
    torch.Tensor
        float64 ``[min(out, in)]``, descending, non-negative.
    """
    g = _gram_lower(delta)
    with one_thread():
        eig = openblas.eigvalsh(g)
    return eig.flip(0).clamp_min_(0.0).sqrt_()


def singular_values_reference(delta: torch.Tensor) -> torch.Tensor:
    """float64 SVD singular values (the reference for :func:`singular_values`), descending."""
    return torch.linalg.svdvals(delta.to(torch.float64))


def spectrum_and_factors(delta: torch.Tensor, rank_of: Callable[[torch.Tensor], int]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular values of ``delta`` and its best rank-r factors, r chosen from the spectrum, from ONE eigh.

    Parameters
    ----------
    delta : torch.Tensor
        ``[out, in]`` floating point.
    rank_of : callable
        ``rank_of(singular float64 [min(out, in)] descending) -> r`` in ``[0, min(out, in)]``.

    Returns
    -------
    singular : torch.Tensor
        float64 ``[min(out, in)]`` descending.
    a, b : torch.Tensor
        float64 ``[out, r]`` and ``[r, in]`` with ``a @ b`` the truncated SVD of ``delta`` at rank r.
    """
    g = _gram_lower(delta)
    with one_thread():
        values, vectors = openblas.eigh(g)
    singular = values.flip(0).clamp_min_(0.0).sqrt_()
    r = int(rank_of(singular))
    return (singular, *_factors(delta, vectors[:, values.numel() - r:].flip(1)))


def _factors(delta: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` from the top singular vectors ``top [small, r]`` of the smaller side of ``delta``."""
    x, wide = _wide(delta)
    projected = torch.empty(top.shape[1], x.shape[1], dtype=torch.float64)  # top^T @ x, chunk by chunk
    if top.shape[1]:
        scratch = _scratch(x)
        for start, part in _chunks(x, scratch):
            projected[:, start:start + part.shape[1]] = top.T @ part
    # wide: delta ~ top @ (top^T delta); tall: delta^T ~ top @ (top^T delta^T), so delta ~ (delta top) top^T
    return (top.contiguous(), projected) if wide else (projected.T.contiguous(), top.T.contiguous())


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta``: ``A @ B`` is its truncated SVD (Eckart-Young).

    Through the float64 Gram of the smaller side and ``eigh``: ``A = U_r, B = U_r^T delta`` (wide) or
    ``A = delta V_r, B = V_r^T`` (tall).

    Parameters
    ----------
    delta : torch.Tensor
        ``[out, in]`` floating point.
    rank : int
        In ``[0, min(out, in)]``.

    Returns
    -------
    tuple of torch.Tensor
        float64 ``A [out, rank]`` and ``B [rank, in]``.

    Raises
    ------
    ValueError
        ``rank`` out of range.
    """
    if not 0 <= rank <= min(delta.shape):
        raise ValueError(f"rank must be in [0, {min(delta.shape)}] for a {list(delta.shape)} delta, got {rank}")
    _, a, b = spectrum_and_factors(delta, lambda _: rank)
    return a, b


def energy_rank(singular: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k singular values hold ``fraction`` of the energy (sum of squares).

    Parameters
    ----------
    singular : torch.Tensor
        ``[r]`` descending singular values.
    fraction : float
        In (0, 1].

    Returns
    -------
    int
        0 for an all-zero spectrum, else in ``[1, r]``.
    """
    energy = singular.to(torch.float64).square()
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # A tolerance of a few ulps keeps exact-rank cases (cumulative == fraction) on the lower rank.
    return int(torch.searchsorted(cumulative, torch.tensor([fraction - 1e-12], dtype=torch.float64)).item()) + 1


def cumulative_energy(singular: torch.Tensor) -> torch.Tensor:
    """float64 ``[r]`` cumulative energy fraction of a descending spectrum (zeros if all-zero)."""
    energy = singular.to(torch.float64).square()
    total = energy.sum()
    return torch.cumsum(energy, 0) / total if total > 0 else torch.zeros_like(energy)
