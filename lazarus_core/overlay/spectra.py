"""Per (layer, projection) expert-delta spectra: everything rank choices and error estimates need.

For a projection with experts ``W_e`` and base ``mean_e(W_e)``, the best rank-r overlay of expert e leaves
the tail energy ``sum_{j >= r} s_{e,j}^2`` of ``delta_e = W_e - base`` (Eckart-Young), so the relative
reconstruction error ``||W_e - base - A_e B_e||_F / ||W_e||_F`` at every rank is read off the spectrum.
Spectra come from ``lazarus_core.analysis.spectra.singular_values`` (float64 Gram + eigvalsh).
"""

from __future__ import annotations

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
    """

    layer: int
    projection: str
    shape: tuple[int, int]
    singular: torch.Tensor
    expert_energy: torch.Tensor

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
        """Smallest rank at which EVERY expert keeps ``fraction`` of its delta energy (max over experts)."""
        return max((energy_rank(row, fraction) for row in self.singular), default=0)

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


def projection_spectrum(ckpt: MoeCheckpoint, layer: int, projection: str, *, backend: str = "auto",
                        on_expert: Callable[[], None] | None = None) -> ProjectionSpectrum:
    """Spectra of every expert's delta from the mean for one projection (two passes, ~2 experts in memory)."""
    base = mean_expert(ckpt, layer, projection, backend=backend)
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
                              torch.tensor(energies, dtype=torch.float64))


def error_summary(errors: torch.Tensor) -> dict[str, float]:
    """``{"mean": ..., "max": ...}`` of per-expert errors."""
    return {"mean": float(errors.mean()) if errors.numel() else 0.0,
            "max": float(errors.max()) if errors.numel() else 0.0}
