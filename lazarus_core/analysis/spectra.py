"""Singular spectra of expert deltas and the energy ranks read from them.

Method, chosen by measurement on this CPU (2 cores; [1024, 2048] fp32 delta): ``torch.linalg.svdvals``
takes ~8 s, the Gram route ~0.5 s (float64 Gram GEMM 0.15 s + float64 symmetric eigensolver 0.33 s).
The Gram is formed in float64 so that ranks match a float64 SVD exactly: a float32 Gram perturbs the
energy curve by ~1e-6 of the total, enough to flip an occasional rank at a threshold.

The eigensolver runs on one thread: on this 2-core machine, with another process busy, LAPACK's
tridiagonalisation on 2 threads took 5.7 s for a 1024 x 1024 Gram against 0.17 s on one (idle: about
the same either way), because its threads spin-wait on each other.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

ENERGY_FRACTIONS = (0.90, 0.95, 0.99)
GRAM_CHUNK = 512  # columns per float64 Gram update


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
    x = delta if delta.shape[0] <= delta.shape[1] else delta.T  # [small, large] view, no copy
    gram = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    # float64 columns in chunks: the same flops as one GEMM, without a float64 copy of the whole delta.
    for start in range(0, x.shape[1], GRAM_CHUNK):
        part = x[:, start:start + GRAM_CHUNK].to(torch.float64)
        gram.addmm_(part, part.T)
    with one_thread():
        eig = torch.linalg.eigvalsh(gram)
    return eig.flip(0).clamp_min_(0.0).sqrt_()


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


def singular_values_reference(delta: torch.Tensor) -> torch.Tensor:
    """float64 SVD singular values (the reference for :func:`singular_values`), descending."""
    return torch.linalg.svdvals(delta.to(torch.float64))


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
