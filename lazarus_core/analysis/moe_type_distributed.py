"""moe-type-analyze over the ranks of a torch.distributed job (``torchrun ... lazarus introspect moe-expert
moe-type-analyze``): the layers are dealt to the ranks; with fewer layers than ranks the experts of a layer
are split over the ranks that share it. Rank 0 joins the pieces into the report a single process writes.

Layer split: each rank runs :func:`~lazarus_core.analysis.expert_structure.analyze_layer` on its layers.

Expert split (fewer layers than ranks): every rank of a layer's group forms the same shared bases (the mean
expert, the rounding-noise energies and the refined base: one streaming pass each, computed by every rank
rather than sent, since a rank needs them before it can take a delta), then the singular spectra of its
contiguous share of the experts only; rank 0 concatenates the spectra in expert order and reads the layer's
structure off them. The E x E cosine Gram is a sum over row chunks of all experts: the ranks of a layer split
the chunks (contiguous shares) and rank 0 adds the chunk Grams in chunk order, as one process does.

The per-expert spectra are computed by the same engine calls on the same inputs as in one process, so the
report is the same (ranks per expert, the call); only ``seconds`` differs, and ``distributed`` is added.

Resumable (layer split, with ``parts_dir``; the CLI uses ``OUT.json.parts/``): each finished layer is saved as
``layer-LLLLL.json`` with the source layer's fingerprint digest and the base method; a rerun after a failed
rank loads the layers saved for the same source and base instead of computing them, and rank 0 removes the
directory once the report is joined.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from lazarus_core.analysis.expert_structure import (LayerStructure, MoeTypeReport, _structure, analyze_layer,
                                                    compression_summary, cosine_chunks, cosine_gram_parts,
                                                    layer_structure, moe_type_report, spectrum_passes, sum_in_order)
from lazarus_core.atomic_io import atomic_write_json
from lazarus_core.distributed import World, assign_round_robin, on_every_rank, split_contiguous, use_local_gpu
from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint
from lazarus_core.spectra import ProjectionSpectrum, overlay_base, projection_spectrum
from lazarus_core.spectra.deltas import marchenko_pastur_edge, mean_and_noise
from lazarus_core.spectra.linalg import threads_for


def moe_type_assignment(layers: list[int], world_size: int, num_experts: int
                        ) -> tuple[dict[int, list[int]], dict[int, range] | None]:
    """Which rank analyses what.

    Parameters
    ----------
    layers : list of int
        The MoE layers of the job, in report order.
    world_size, num_experts : int

    Returns
    -------
    layers_of : dict
        ``rank -> [layers]``: round robin when there are at least as many layers as ranks; otherwise rank r
        takes layer ``layers[r % len(layers)]``.
    experts_of : dict or None
        None for a layer split; else ``rank -> range`` of the experts (contiguous, about equal) it computes
        within its layer (possibly empty when a layer has fewer experts than ranks).
    """
    if len(layers) >= world_size or not layers:
        return assign_round_robin(layers, world_size), None
    layer_of = {r: layers[r % len(layers)] for r in range(world_size)}
    experts_of: dict[int, range] = {}
    for layer in layers:
        group = [r for r in range(world_size) if layer_of[r] == layer]
        experts_of.update(zip(group, split_contiguous([1.0] * num_experts, len(group))))
    return {r: [layer_of[r]] for r in range(world_size)}, experts_of


class ExpertSubset:
    """A view of a checkpoint with only experts ``experts`` (expert i of the view is ``experts[i]``): what the
    spectra engine streams when a rank computes its share of a layer's experts (moe-type-analyze and the
    distributed overlay jobs)."""

    def __init__(self, ckpt: MoeCheckpoint, experts: range):
        self._ckpt, self._experts = ckpt, experts

    @property
    def num_experts(self) -> int:
        return len(self._experts)

    def encoded_expert(self, layer: int, projection: str, expert: int):
        return self._ckpt.encoded_expert(layer, projection, self._experts[expert])

    def __getattr__(self, name: str):
        return getattr(self._ckpt, name)


def projection_share(ckpt: MoeCheckpoint, layer: int, projection: str, experts: range, *, backend: str = "auto",
                     base_method: str = "refined", mean_spectrum: bool = True,
                     on_expert: Callable[[], None] | None = None, device: str | None = None,
                     workers: int | None = None
                     ) -> tuple[ProjectionSpectrum | None, ProjectionSpectrum, torch.Tensor]:
    """One projection's spectra of ``experts`` of ``layer`` from the bases of ALL the layer's experts (the calls
    :func:`~lazarus_core.spectra.projection_spectrum` makes, restricted to those experts).

    Parameters
    ----------
    ckpt : MoeCheckpoint
    layer : int
    projection : {"gate", "up", "down"}
    experts : range
        Contiguous, non-empty share of the layer's experts.
    backend, on_expert, device, workers
        As :func:`~lazarus_core.spectra.projection_spectrum`.
    base_method : {"refined", "mean"}
        The compressor's base.
    mean_spectrum : bool
        Also compute the spectra from the mean base (moe-type-analyze reads both); with ``base_method="mean"``
        it is the compressor spectrum anyway.

    Returns
    -------
    mean_spectrum : ProjectionSpectrum or None
        ``[len(experts), ...]`` spectra from the mean expert (None when not asked for and not the compressor's).
    compressor : ProjectionSpectrum
        ``[len(experts), ...]`` spectra from the ``base_method`` base (``base`` None, ``base_method`` set).
    base : torch.Tensor
        fp32 ``[out, in]`` the ``base_method`` base of the whole layer.
    """
    view = ExpertSubset(ckpt, experts)
    shape = ckpt.projection_shape(projection)
    with threads_for(shape):
        mean, noise = mean_and_noise(ckpt, layer, projection, backend=backend)
    mine = None if noise is None else noise[experts.start:experts.stop]
    spectrum = None
    if mean_spectrum or base_method == "mean":
        spectrum = projection_spectrum(view, layer, projection, backend=backend, base_method="mean", mean=mean,
                                       noise_energy=mine, on_expert=on_expert, device=device, workers=workers)
    if base_method == "mean":
        return spectrum, spectrum, mean
    edges = None if noise is None else marchenko_pastur_edge(noise, shape)
    base = overlay_base(ckpt, layer, projection, method=base_method, backend=backend, edges=edges, mean=mean,
                        device=device, workers=workers)
    compressor = projection_spectrum(view, layer, projection, backend=backend, base_method="mean", mean=base,
                                     noise_energy=mine, on_expert=on_expert, device=device, workers=workers)
    compressor.base_method = base_method
    return spectrum, compressor, base


def _expert_share(ckpt: MoeCheckpoint, layer: int, experts: range, share: tuple[int, int], *, backend: str,
                  base_method: str, on_expert: Callable[[], None] | None, device: str | None, workers: int | None
                  ) -> list[tuple[str, int, ProjectionSpectrum, ProjectionSpectrum, int, list[torch.Tensor]]]:
    """``[(projection, first_expert, mean-base spectrum, compressor spectrum, first cosine chunk, cosine Gram
    parts)]`` of ``experts`` of ``layer``. ``share = (index, count)``: this rank's place among the ranks with
    experts of the layer, which also split the cosine Gram's row chunks (contiguous shares, summed in chunk
    order by rank 0). The first share sends its chunks already summed (that prefix is exactly the one a single
    process forms first); the others send one Gram per chunk, for rank 0 to add in order."""
    pieces = []
    for p in PROJECTIONS:
        spectrum, compressor, _ = projection_share(ckpt, layer, p, experts, backend=backend, base_method=base_method,
                                                   on_expert=on_expert, device=device, workers=workers)
        chunks = cosine_chunks(ckpt, layer, p)
        mine = split_contiguous([1.0] * len(chunks), share[1])[share[0]]
        grams = cosine_gram_parts(ckpt, layer, p, chunks[mine.start:mine.stop])
        grams = [sum_in_order(grams, ckpt.num_experts)] if mine.start == 0 else list(grams)
        pieces.append((p, experts.start, spectrum, compressor, mine.start, grams))
    return pieces


def join_spectra(pieces: list[ProjectionSpectrum]) -> ProjectionSpectrum:
    """One projection's spectrum from its experts' pieces (in expert order; ``base`` None)."""
    first = pieces[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(sp, name) for sp in pieces]
        return None if values[0] is None else torch.cat(values)

    return ProjectionSpectrum(first.layer, first.projection, first.shape, cat("singular"), cat("expert_energy"),
                              cat("noise_edge"), cat("noise_energy"), None, first.base_method)


def distributed_record(layers_of: dict[int, list[int]], experts_of: dict[int, range] | None, world_size: int) -> dict:
    """``{"world_size", "assignment": {"RANK": [layers]}}`` and, for an expert split, ``"experts": {"RANK":
    [first, last]}`` (``[]`` for an empty share): what a distributed job's output records."""
    record = {"world_size": world_size, "assignment": {str(r): v for r, v in layers_of.items()}}
    if experts_of is not None:
        record["experts"] = {str(r): [e.start, e.stop - 1] if len(e) else [] for r, e in experts_of.items()}
    return record


def analyze_moe_type_distributed(ckpt: MoeCheckpoint, layers: list[int], *, world: World, backend: str = "auto",
                                 progress: bool = False, model_name: str | None = None, base_method: str = "refined",
                                 device: str | None = None, workers: int | None = None,
                                 parts_dir: str | Path | None = None) -> MoeTypeReport:
    """:func:`~lazarus_core.analysis.expert_structure.analyze_moe_type` with the work split over ``world``.

    Parameters
    ----------
    ckpt : MoeCheckpoint
    layers : list of int
        MoE layers, in report order.
    world : World
        The job (every rank calls this with the same arguments).
    backend, progress, model_name, base_method, device, workers
        As :func:`~lazarus_core.analysis.expert_structure.analyze_moe_type` (only rank 0 shows progress).
    parts_dir : str or Path, optional
        Where finished layers are kept until the report is joined (a layer split reuses the ones saved there
        for the same source tensors and base; see the module docstring). On a file system every rank sees.

    Returns
    -------
    MoeTypeReport
        The same on every rank; ``distributed = {"world_size", "assignment": {"RANK": [layers]}}`` and, for an
        expert split, ``"experts": {"RANK": [first, last]}`` (empty share: ``[]``).

    Raises
    ------
    RankFailed
        On every rank when any rank failed (names the ranks and their errors).
    """
    from lazarus_core.overlay.compute import progress_bar

    t0 = time.perf_counter()
    use_local_gpu()  # --device cuda: each rank's own GPU
    layers_of, experts_of = moe_type_assignment(layers, world.world_size, ckpt.num_experts)
    mine = layers_of[world.rank]
    per_layer = len(PROJECTIONS) * spectrum_passes(base_method)
    work = per_layer * (ckpt.num_experts * len(mine) if experts_of is None else len(experts_of[world.rank]))

    def share():
        with progress_bar(progress and world.is_root, work, f"expert spectra (rank 0 of {world.world_size})") as step:
            if experts_of is None:
                return [_saved_layer(parts_dir, ckpt, layer, base_method, lambda layer=layer: analyze_layer(
                    ckpt, layer, backend=backend, base_method=base_method, on_expert=step, device=device,
                    workers=workers)) for layer in mine]
            if not experts_of[world.rank]:
                return []
            group = [r for r in range(world.world_size) if layers_of[r] == mine and experts_of[r]]
            return _expert_share(ckpt, mine[0], experts_of[world.rank], (group.index(world.rank), len(group)),
                                 backend=backend, base_method=base_method, on_expert=step, device=device,
                                 workers=workers)

    distributed = distributed_record(layers_of, experts_of, world.world_size)
    parts = world.gather(on_every_rank(world, "distributed moe-type-analyze", share))

    def join() -> MoeTypeReport | None:
        if not world.is_root:
            return None
        report = _join(ckpt, layers, parts, experts_of is not None, model_name, base_method)
        report.seconds, report.distributed = time.perf_counter() - t0, distributed
        if parts_dir is not None:
            shutil.rmtree(parts_dir, ignore_errors=True)
        return report

    report = world.broadcast(on_every_rank(world, "distributed moe-type-analyze (joining on rank 0)", join))
    return report


def _saved_layer(parts_dir: str | Path | None, ckpt: MoeCheckpoint, layer: int, base_method: str,
                 compute: Callable[[], LayerStructure]) -> LayerStructure:
    """The layer saved in ``parts_dir`` for this source layer and base, else ``compute()`` (then saved)."""
    if parts_dir is None:
        return compute()
    from lazarus_core.analysis.moe_type_merge import layer_from_dict
    from lazarus_core.overlay.fingerprint import layer_digest, source_fingerprint

    key = {"source": layer_digest(ckpt, source_fingerprint(ckpt, [layer]), layer), "base_method": base_method}
    path = Path(parts_dir) / f"layer-{layer:05d}.json"
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return layer_from_dict(saved["layer"])
    except (OSError, ValueError, KeyError, TypeError):  # missing, torn or foreign: compute it again
        pass
    structure = compute()
    Path(parts_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "layer": structure.to_dict()})
    return structure


def _join(ckpt: MoeCheckpoint, layers: list[int], parts: list[list], by_experts: bool, model_name: str | None,
          base_method: str) -> MoeTypeReport:
    """Rank 0: the report from every rank's share, in ``layers`` order."""
    if by_experts:
        pieces: dict[tuple[int, str], list] = {}
        cosine: dict[tuple[int, str], list] = {}
        for part in parts:
            for p, start, spectrum, compressor, first_chunk, grams in part:
                pieces.setdefault((spectrum.layer, p), []).append((start, spectrum, compressor))
                cosine.setdefault((spectrum.layer, p), []).extend(enumerate(grams, first_chunk))
        results = []
        for layer in layers:
            structures = {}
            for p in PROJECTIONS:
                ordered = sorted(pieces[(layer, p)], key=lambda x: x[0])
                grams = [g for _, g in sorted(cosine[(layer, p)], key=lambda x: x[0])]
                structures[p] = _structure(ckpt, layer, join_spectra([x[1] for x in ordered]),
                                           join_spectra([x[2] for x in ordered]),
                                           sum_in_order(grams, ckpt.num_experts))
            results.append(layer_structure(layer, structures))
    else:
        by_layer = {structure.layer: structure for part in parts for structure in part}
        results = [by_layer[layer] for layer in layers]
    return moe_type_report(results, model=model_name or str(ckpt.source), family=ckpt.family,
                           num_experts=ckpt.num_experts, top_k=ckpt.spec.top_k,
                           compression=compression_summary(ckpt, results, base_method), seconds=0.0)


__all__ = ["ExpertSubset", "analyze_moe_type_distributed", "distributed_record", "join_spectra", "moe_type_assignment",
           "projection_share"]
