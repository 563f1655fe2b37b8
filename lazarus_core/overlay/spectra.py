"""Per (layer, projection) expert-delta spectra: everything rank choices and error estimates need.

For a projection with experts ``W_e`` and base ``mean_e(W_e)``, the best rank-r overlay of expert e leaves
the tail energy ``sum_{j >= r} s_{e,j}^2`` of ``delta_e = W_e - base`` (Eckart-Young), so the relative
reconstruction error ``||W_e - base - A_e B_e||_F / ||W_e||_F`` at every rank is read off the spectrum.
Spectra come from ``lazarus_core.analysis.spectra.singular_values`` (float64 Gram + eigvalsh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from lazarus_core.analysis.spectra import energy_rank, singular_values
from lazarus_core.models.checkpoint import MoeCheckpoint
from lazarus_core.models.encoded import read_encoded_expert


@dataclass
class ProjectionSpectrum:
    """Delta spectra of one projection of one MoE layer.

    Attributes
    ----------
    layer : int
    projection : str
    shape : tuple of int
        ``(out, in)``.
    singular : torch.Tensor
        float64 ``[E, min(out, in)]``, each row descending.
    expert_energy : torch.Tensor
        float64 ``[E]``: ``||W_e||_F^2``.
    noise_edge : torch.Tensor or None
        float64 ``[E]`` for quantised sources (MXFP4, FP8): the largest singular value white noise of the
        expected rounding-noise energy would have, ``sigma (sqrt(out) + sqrt(in))`` (Marchenko-Pastur edge);
        components below it are rounding noise, not expert structure. None for float sources.
    """

    layer: int
    projection: str
    shape: tuple[int, int]
    singular: torch.Tensor
    expert_energy: torch.Tensor
    noise_edge: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.singular.shape[0]

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    def relative_errors(self, rank: int) -> torch.Tensor:
        """float64 ``[E]``: relative Frobenius error of each expert at ``rank``."""
        tail = self.singular[:, rank:].square().sum(1)
        return torch.where(self.expert_energy > 0, (tail / self.expert_energy.clamp_min(1e-300)).sqrt(),
                           torch.zeros_like(tail))

    def captured_energy(self, rank: int) -> float:
        """Fraction of the delta energy (all experts) kept at ``rank`` (1.0 when the deltas are zero)."""
        total = float(self.singular.square().sum())
        return float(self.singular[:, :rank].square().sum()) / total if total > 0 else 1.0

    def energy_rank(self, fraction: float) -> int:
        """Smallest rank at which EVERY expert keeps ``fraction`` of its delta energy (max over experts).

        For quantised sources the energy counted is that of the components above the rounding-noise edge:
        fitting the noise the encoding added would only copy it (documented in docs/overlay_format.md)."""
        ranks = []
        for e, row in enumerate(self.singular):
            if self.noise_edge is not None:
                row = row[row > self.noise_edge[e]]
            ranks.append(energy_rank(row, fraction) if row.numel() else 0)
        return max(ranks, default=0)

    def rank_above_noise(self) -> list[int] | None:
        """Per expert: singular values above the noise edge (None for float sources)."""
        if self.noise_edge is None:
            return None
        return [int((row > edge).sum()) for row, edge in zip(self.singular, self.noise_edge)]

    def component_gain(self) -> torch.Tensor:
        """float64 ``[min(out, in)]``: delta energy of the j-th component summed over experts, as a fraction
        of the projection's total expert weight energy (non-increasing in j)."""
        total = float(self.expert_energy.sum())
        return self.singular.square().sum(0) / total if total > 0 else torch.zeros(self.max_rank, dtype=torch.float64)


def mean_expert(ckpt: MoeCheckpoint, layer: int, projection: str, *, backend: str = "auto") -> torch.Tensor:
    """fp32 ``[out, in]`` mean of the layer's experts (the overlay base), one fused decode pass per expert."""
    base = torch.zeros(ckpt.projection_shape(projection), dtype=torch.float32)
    n = ckpt.num_experts
    for e in range(n):
        read_encoded_expert(ckpt, layer, projection, e).axpby(base, alpha=1.0 / n, out=base, backend=backend)
    return base


def iter_deltas(ckpt: MoeCheckpoint, layer: int, projection: str, base: torch.Tensor, *, backend: str = "auto"):
    """Yield ``(expert, delta [out, in] fp32)``; the yielded buffer is reused (consume before the next)."""
    delta = torch.empty_like(base)
    for e in range(ckpt.num_experts):
        read_encoded_expert(ckpt, layer, projection, e).axpby(base, alpha=1.0, beta=-1.0, out=delta, backend=backend)
        yield e, delta


def noise_edges(ckpt: MoeCheckpoint, layer: int, projection: str) -> torch.Tensor | None:
    """float64 ``[E]`` Marchenko-Pastur edge of each expert's expected rounding noise, or None (float source)."""
    out_dim, in_dim = ckpt.projection_shape(projection)
    edges = []
    for e in range(ckpt.num_experts):
        noise = read_encoded_expert(ckpt, layer, projection, e).rounding_noise_energy()
        if noise is None:
            return None
        edges.append(math.sqrt(noise / (out_dim * in_dim)) * (math.sqrt(out_dim) + math.sqrt(in_dim)))
    return torch.tensor(edges, dtype=torch.float64)


def _probe_low_rank(delta: torch.Tensor, edge: float | None, cap: int) -> torch.Tensor:
    """float64 low-rank part of ``delta`` used to refine the base: the components before the largest gap
    (ratio of consecutive singular values) among those above the noise edge (or above 1e-6 of the largest,
    for float sources), at most ``cap`` of them."""
    from lazarus_core.overlay.compute import factorize

    sv = singular_values(delta)
    if sv.numel() == 0 or float(sv[0]) == 0.0:
        return torch.zeros_like(delta, dtype=torch.float64)
    floor = edge if edge is not None else 1e-6 * float(sv[0])
    m = min(int((sv > floor).sum()), cap)
    if m == 0:
        return torch.zeros_like(delta, dtype=torch.float64)
    upto = min(m + 1, sv.numel())
    ratios = sv[:upto - 1] / sv[1:upto].clamp_min(1e-300) if upto > 1 else torch.ones(1, dtype=torch.float64)
    r = int(torch.argmax(ratios[:m])) + 1
    a, b = factorize(delta, r)
    return a @ b


def overlay_base(ckpt: MoeCheckpoint, layer: int, projection: str, *, method: str = "refined", iterations: int = 5,
                 backend: str = "auto", edges: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[out, in]`` shared base of one projection.

    ``"mean"``: the mean expert. ``"refined"`` (default): alternating least squares on
    ``sum_e ||W_e - base - L_e||^2`` with each ``L_e`` the expert's dominant low-rank part (the components
    before the largest spectral gap above the noise edge; at most min(out, in) / 4): ``base <- mean_e(W_e - L_e)``,
    ``iterations`` times, starting from the mean. For an upcycled layer this removes from every delta the
    1/E share of the other experts' differences that the mean carries, so each delta keeps only its own rank.
    Streams the experts (one decoded at a time) once per iteration.
    """
    if method not in ("mean", "refined"):
        raise ValueError(f"--base must be 'mean' or 'refined', got {method!r}")
    base = mean_expert(ckpt, layer, projection, backend=backend)
    if method == "mean":
        return base
    cap = max(1, min(base.shape) // 4)
    n = ckpt.num_experts
    for _ in range(iterations):
        acc = torch.zeros_like(base, dtype=torch.float64)
        for e, delta in iter_deltas(ckpt, layer, projection, base, backend=backend):
            low = _probe_low_rank(delta, None if edges is None else float(edges[e]), cap)
            acc += (base.double() + delta.double() - low) / n
        base = acc.float()
    return base


def projection_spectrum(ckpt: MoeCheckpoint, layer: int, projection: str, *, backend: str = "auto",
                        base_method: str = "refined", on_expert: Callable[[], None] | None = None
                        ) -> ProjectionSpectrum:
    """Spectra of every expert's delta from the overlay base for one projection (~2 experts in memory)."""
    edges = noise_edges(ckpt, layer, projection)
    base = overlay_base(ckpt, layer, projection, method=base_method, backend=backend, edges=edges)
    base64 = base.reshape(-1).double()
    base_energy = float(base64.square().sum())
    rows, energies = [], []
    for _, delta in iter_deltas(ckpt, layer, projection, base, backend=backend):
        sv = singular_values(delta)
        rows.append(sv)
        cross = 2.0 * float(torch.dot(base64, delta.reshape(-1).double()))
        energies.append(max(base_energy + cross + float(sv.square().sum()), 0.0))
        if on_expert is not None:
            on_expert()
    return ProjectionSpectrum(layer, projection, ckpt.projection_shape(projection), torch.stack(rows),
                              torch.tensor(energies, dtype=torch.float64), edges)


def error_summary(errors: torch.Tensor) -> dict[str, float]:
    """``{"mean": ..., "max": ...}`` of per-expert errors."""
    return {"mean": float(errors.mean()) if errors.numel() else 0.0,
            "max": float(errors.max()) if errors.numel() else 0.0}
