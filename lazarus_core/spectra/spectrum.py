"""Per (layer, projection) expert-delta spectra: everything rank choices, error estimates and the
moe-type analysis read, and the ONE energy definition the compressor's ``--energy`` / ``--preset`` count.

For a projection with experts ``W_e`` and base ``B``, the best rank-r overlay of expert e leaves the tail
energy ``sum_{j >= r} s_{e,j}^2`` of ``delta_e = W_e - B`` (Eckart-Young), so the relative reconstruction
error ``||W_e - B - A_e B_e||_F / ||W_e||_F`` at every rank is read off the spectrum.

Energy kept (docs/overlay_format.md, docs/moe_type.md): per expert, the fraction of that expert's delta
energy (delta from the overlay base) held by its top-r components, counting only the components above the
quantisation-noise edge (all components for float sources). A projection's rank for a fraction f is the
max over experts of the smallest rank keeping f.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lazarus_core.models.checkpoint import MoeCheckpoint
from lazarus_core.spectra.deltas import marchenko_pastur_edge, mean_and_noise, overlay_base
from lazarus_core.spectra.linalg import energy_rank, threads_for
from lazarus_core.spectra.parallel import delta_spectra

_DOT_CHUNK = 1 << 16  # elements per float64 dot-product chunk (no float64 copy of a whole expert)


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
    noise_energy : torch.Tensor or None
        float64 ``[E]``: the expected rounding-noise energy behind ``noise_edge`` (None for float sources).
    base : torch.Tensor or None
        fp32 ``[out, in]`` base the deltas are taken from (only with ``keep_base=True``).
    base_method : str
        ``"refined"`` or ``"mean"``.
    """

    layer: int
    projection: str
    shape: tuple[int, int]
    singular: torch.Tensor
    expert_energy: torch.Tensor
    noise_edge: torch.Tensor | None = None
    noise_energy: torch.Tensor | None = None
    base: torch.Tensor | None = None
    base_method: str = "refined"

    @property
    def num_experts(self) -> int:
        return self.singular.shape[0]

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    def delta_energy(self) -> torch.Tensor:
        """float64 ``[E]``: ``||delta_e||_F^2`` (all components)."""
        return self.singular.square().sum(1)

    def counted_components(self) -> torch.Tensor:
        """int64 ``[E]``: components the energy counts per expert (above the noise edge; all for floats).

        Rows are descending, so the counted components of expert e are its first ``counted[e]``."""
        if self.noise_edge is None:
            return torch.full((self.num_experts,), self.singular.shape[1], dtype=torch.int64)
        return (self.singular > self.noise_edge[:, None]).sum(1)

    def kept_energy(self, rank: int) -> torch.Tensor:
        """float64 ``[E]``: per expert, the fraction of its counted delta energy (components above the noise
        edge; all for float sources) held by its top ``rank`` components; 1.0 where nothing is counted."""
        energy = self.singular.square()
        index = torch.arange(energy.shape[1])
        counted = index[None, :] < self.counted_components()[:, None]
        total = torch.where(counted, energy, 0.0).sum(1)
        kept = torch.where(counted & (index[None, :] < rank), energy, 0.0).sum(1)
        return torch.where(total > 0, kept / total.clamp_min(1e-300), torch.ones_like(total))

    def captured_energy(self, rank: int) -> float:
        """The least energy kept by any expert at ``rank`` (``kept_energy(rank).min()``; 1.0 with no experts).

        This is the "energy kept" moe-overlay-compute prints: at the rank :meth:`energy_rank` chooses for a
        fraction f it is >= f (up to 1e-12)."""
        kept = self.kept_energy(rank)
        return float(kept.min()) if kept.numel() else 1.0

    def energy_rank(self, fraction: float) -> int:
        """Smallest rank at which EVERY expert keeps ``fraction`` of its counted delta energy (max over experts).

        For quantised sources only the components above the rounding-noise edge count: fitting the noise the
        encoding added would only copy it (documented in docs/overlay_format.md)."""
        counted = self.counted_components()
        return max((energy_rank(row[:int(c)], fraction) if int(c) else 0 for row, c in zip(self.singular, counted)),
                   default=0)

    def rank_above_noise(self) -> list[int] | None:
        """Per expert: singular values above the noise edge (None for float sources)."""
        return None if self.noise_edge is None else [int(c) for c in self.counted_components()]

    def relative_errors(self, rank: int) -> torch.Tensor:
        """float64 ``[E]``: relative Frobenius error of each expert at ``rank``."""
        tail = self.singular[:, rank:].square().sum(1)
        return torch.where(self.expert_energy > 0, (tail / self.expert_energy.clamp_min(1e-300)).sqrt(),
                           torch.zeros_like(tail))

    def component_gain(self) -> torch.Tensor:
        """float64 ``[min(out, in)]``: delta energy of the j-th component summed over experts, as a fraction
        of the projection's total expert weight energy (non-increasing in j)."""
        total = float(self.expert_energy.sum())
        return self.singular.square().sum(0) / total if total > 0 else torch.zeros(self.max_rank, dtype=torch.float64)


def _dot64(x: torch.Tensor, y: torch.Tensor) -> float:
    """float64 dot product of two same-size tensors, in chunks (no float64 copy of either)."""
    x, y = x.reshape(-1), y.reshape(-1)
    return sum(float(torch.dot(x[s:s + _DOT_CHUNK].double(), y[s:s + _DOT_CHUNK].double()))
               for s in range(0, x.numel(), _DOT_CHUNK))


def projection_spectrum(ckpt: MoeCheckpoint, layer: int, projection: str, *, backend: str = "auto",
                        base_method: str = "refined", on_expert: Callable[[], None] | None = None,
                        keep_base: bool = False, mean: torch.Tensor | None = None,
                        noise_energy: torch.Tensor | None = None, device: str | torch.device | None = None,
                        workers: int | None = None, batch: int | None = None) -> ProjectionSpectrum:
    """Spectra of every expert's delta from the overlay base for one projection.

    Memory does not grow with E: one decoded expert, the base and one delta buffer, the float64 Gram and
    its eigensolve (the refined base adds a float64 accumulator; docs/moe_type.md gives measured peaks).

    Parameters
    ----------
    ckpt : MoeCheckpoint
    layer : int
        Model layer index of an MoE layer.
    projection : {"gate", "up", "down"}
    backend : str
        Kernel backend of the fused decode passes.
    base_method : {"refined", "mean"}
        The overlay base (:func:`lazarus_core.spectra.overlay_base`).
    on_expert : callable, optional
        Called after each expert of the final spectrum pass (progress).
    keep_base : bool
        Keep the base (fp32 ``[out, in]``) in the result, so writing reuses the planning base.
    mean, noise_energy : torch.Tensor, optional
        The mean expert (fp32 ``[out, in]``) and rounding-noise energies (float64 ``[E]`` or None for a float
        source) from an earlier pass over the same projection; when ``mean`` is given both are taken as is.
    device : str or torch.device
        Where the Grams and eigensolves run (:mod:`lazarus_core.spectra.parallel`): "cpu" (per-expert
        single-threaded workers) or an accelerator such as "cuda" (batched over experts, float64); default
        the process default (:func:`~lazarus_core.spectra.parallel.use_device`, "cpu" unless set).
    workers : int, optional
        CPU worker threads (default: every core for large matrices, 1 for small ones).
    batch : int, optional
        Experts per batched call (default on a device: :data:`~lazarus_core.spectra.parallel.DEVICE_BATCH_BYTES`
        of deltas); given with ``device="cpu"``, the batched path runs on CPU tensors.

    Returns
    -------
    ProjectionSpectrum
    """
    shape = ckpt.projection_shape(projection)
    with threads_for(shape):
        if mean is None:
            mean, noise_energy = mean_and_noise(ckpt, layer, projection, backend=backend)
        edges = None if noise_energy is None else marchenko_pastur_edge(noise_energy, shape)
        base = overlay_base(ckpt, layer, projection, method=base_method, backend=backend, edges=edges, mean=mean,
                            device=device, workers=workers, batch=batch)
        base_energy = _dot64(base, base)
        rows, energies = [], []
        for sv, dot in delta_spectra(ckpt, layer, projection, base, lambda d: _dot64(base, d), backend=backend,
                                     device=device, workers=workers, batch=batch):
            rows.append(sv)
            energies.append(max(base_energy + 2.0 * dot + float(sv.square().sum()), 0.0))
            if on_expert is not None:
                on_expert()
    return ProjectionSpectrum(layer, projection, shape, torch.stack(rows), torch.tensor(energies, dtype=torch.float64),
                              edges, noise_energy, base if keep_base else None, base_method)


def error_summary(errors: torch.Tensor) -> dict[str, float]:
    """``{"mean": ..., "max": ...}`` of per-expert errors."""
    return {"mean": float(errors.mean()) if errors.numel() else 0.0,
            "max": float(errors.max()) if errors.numel() else 0.0}
