"""Streaming passes over one projection's experts: the mean expert, the deltas from a base, the
quantisation-noise edge of each expert, and the shared overlay base (mean or refined).

Every pass holds about one decoded expert: experts are read in their stored encoding and decoded by the
fused ``dequant_axpby`` op straight into the running sum or into one reused delta buffer.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from lazarus_core.models.checkpoint import MoeCheckpoint
from lazarus_core.spectra.linalg import threads_for
from lazarus_core.spectra.parallel import low_rank_parts

BASE_METHODS = ("refined", "mean")


def mean_expert(ckpt: MoeCheckpoint, layer: int, projection: str, *, backend: str = "auto") -> torch.Tensor:
    """fp32 ``[out, in]`` mean of the layer's experts, one fused decode pass per expert."""
    return mean_and_noise(ckpt, layer, projection, backend=backend, noise=False)[0]


def mean_and_noise(ckpt: MoeCheckpoint, layer: int, projection: str, *, backend: str = "auto", noise: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mean expert and (in the same pass) each expert's expected rounding-noise energy.

    Returns
    -------
    mean : torch.Tensor
        fp32 ``[out, in]``.
    noise_energy : torch.Tensor or None
        float64 ``[E]``: expected ``||rounding noise||_F^2`` of each stored expert (MXFP4/FP8; uniform-error
        model, see ``EncodedExpert.rounding_noise_energy``); None for float sources or ``noise=False``.
    """
    base = torch.zeros(ckpt.projection_shape(projection), dtype=torch.float32)
    n = ckpt.num_experts
    energies: list[float] | None = [] if noise else None
    for e in range(n):
        encoded = ckpt.encoded_expert(layer, projection, e)
        encoded.axpby(base, alpha=1.0 / n, out=base, backend=backend)
        if energies is not None:
            energy = encoded.rounding_noise_energy()
            energies = None if energy is None else energies + [energy]
    return base, None if energies is None else torch.tensor(energies, dtype=torch.float64)


def iter_deltas(ckpt: MoeCheckpoint, layer: int, projection: str, base: torch.Tensor, *, backend: str = "auto"
                ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(expert, delta [out, in] fp32)``, ``delta = W_e - base``; the yielded buffer is reused
    (consume it before the next)."""
    delta = torch.empty_like(base)
    for e in range(ckpt.num_experts):
        ckpt.encoded_expert(layer, projection, e).axpby(base, alpha=1.0, beta=-1.0, out=delta, backend=backend)
        yield e, delta


def marchenko_pastur_edge(noise_energy: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """float64 ``[E]``: the largest singular value white noise of that energy has, ``sigma (sqrt(out) +
    sqrt(in))`` with ``sigma^2 = noise_energy / (out * in)`` (Marchenko-Pastur edge)."""
    out_dim, in_dim = shape
    return (noise_energy / (out_dim * in_dim)).sqrt() * (math.sqrt(out_dim) + math.sqrt(in_dim))


def noise_edges(ckpt: MoeCheckpoint, layer: int, projection: str) -> torch.Tensor | None:
    """float64 ``[E]`` Marchenko-Pastur edge of each expert's expected rounding noise, or None (float source)."""
    energies = []
    for e in range(ckpt.num_experts):
        energy = ckpt.encoded_expert(layer, projection, e).rounding_noise_energy()
        if energy is None:
            return None
        energies.append(energy)
    return marchenko_pastur_edge(torch.tensor(energies, dtype=torch.float64), ckpt.projection_shape(projection))


def _probe_rank(singular: torch.Tensor, edge: float | None, cap: int) -> int:
    """Rank of the dominant low-rank part used to refine the base: the components before the largest gap
    (ratio of consecutive singular values) among those above the noise edge (or above 1e-6 of the largest,
    for float sources), at most ``cap`` of them."""
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return 0
    floor = edge if edge is not None else 1e-6 * float(singular[0])
    m = min(int((singular > floor).sum()), cap)
    if m == 0:
        return 0
    upto = min(m + 1, singular.numel())
    if upto == 1:
        return 1
    ratios = singular[:upto - 1] / singular[1:upto].clamp_min(1e-300)
    return int(torch.argmax(ratios[:m])) + 1


def overlay_base(ckpt: MoeCheckpoint, layer: int, projection: str, *, method: str = "refined", iterations: int = 5,
                 backend: str = "auto", edges: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                 device: str | torch.device | None = None, workers: int | None = None, batch: int | None = None
                 ) -> torch.Tensor:
    """fp32 ``[out, in]`` shared base of one projection.

    ``"mean"``: the mean expert. ``"refined"`` (default): alternating least squares on
    ``sum_e ||W_e - base - L_e||^2`` with each ``L_e`` the expert's dominant low-rank part (the components
    before the largest spectral gap above the noise edge; at most min(out, in) / 4): ``base <- mean_e(W_e - L_e)
    = mean - mean_e(L_e)``, ``iterations`` times, starting from the mean. For an upcycled layer this removes
    from every delta the 1/E share of the other experts' differences that the mean carries, so each delta
    keeps only its own rank. Streams the experts (one decoded at a time) once per iteration; the update is
    accumulated in one float64 buffer with rank-r GEMMs (no per-expert dense temporaries).

    Parameters
    ----------
    ckpt : MoeCheckpoint
    layer : int
    projection : {"gate", "up", "down"}
    method : {"refined", "mean"}
    iterations : int
    backend : str
        Kernel backend of the fused decode passes.
    edges : torch.Tensor, optional
        float64 ``[E]`` noise edges (:func:`noise_edges`) for quantised sources.
    mean : torch.Tensor, optional
        fp32 ``[out, in]`` mean expert if already computed.
    device, workers, batch
        Where the per-expert eigensolves run (:func:`lazarus_core.spectra.parallel.low_rank_parts`); the
        update is summed in expert order on the CPU either way.

    Raises
    ------
    ValueError
        Unknown ``method``.
    """
    if method not in BASE_METHODS:
        raise ValueError(f"--base must be 'mean' or 'refined', got {method!r}")
    base = mean if mean is not None else mean_expert(ckpt, layer, projection, backend=backend)
    if method == "mean":
        return base
    cap = max(1, min(base.shape) // 4)
    n = ckpt.num_experts
    mean, refined = base, torch.empty_like(base)
    acc = torch.empty(base.shape, dtype=torch.float64)
    with threads_for(tuple(base.shape)):
        for _ in range(iterations):
            acc.copy_(mean)
            for e, a, b in low_rank_parts(ckpt, layer, projection, base,
                                          lambda e, sv: _probe_rank(sv, None if edges is None else float(edges[e]), cap),
                                          backend=backend, device=device, workers=workers, batch=batch):
                if a.shape[1]:
                    acc.addmm_(a, b, alpha=-1.0 / n)
            base = refined.copy_(acc)  # the deltas of this iteration are done: overwrite in place
    return base
