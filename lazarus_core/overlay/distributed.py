"""moe-overlay-compute and -compress over the ranks of a torch.distributed job (``torchrun ... lazarus
introspect moe-expert moe-overlay-compress``): the layers are dealt to the ranks, each computes its layers'
spectra and writes their plan-cache entries and shards into the one ``--out`` directory, and rank 0 chooses
the ranks from every layer's spectra (a ``--target-ratio`` is global) and writes the one config.

A rank that fails stops every rank (:func:`lazarus_core.distributed.on_every_rank`); what the ranks wrote is
the ordinary resumable state of a compress (``plan-cache/`` entries and current layer shards), so rerunning
the same command, with any number of ranks, reuses it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lazarus_core.atomic_io import atomic_write_json
from lazarus_core.distributed import World, assign_round_robin, on_every_rank, use_local_gpu
from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint
from lazarus_core.overlay.compute import (OverlayPlan, compute_spectra, overlay_fingerprint, plan_overlay,
                                          prepare_overlay_dir, write_overlay)
from lazarus_core.overlay.format import CONFIG_NAME
from lazarus_core.overlay.plan_cache import PLAN_DIR
from lazarus_core.overlay.ranks import RankPolicy
from lazarus_core.spectra import ProjectionSpectrum


@dataclass
class DistributedOverlay:
    """What a distributed compute/compress leaves on each rank.

    Attributes
    ----------
    plan : OverlayPlan
        The plan over every layer (the same on every rank).
    distributed : dict
        ``{"world_size": N, "assignment": {"RANK": [layers...]}}``.
    spectra : dict or None
        Rank 0: ``(layer, projection) -> ProjectionSpectrum`` of every layer (no bases), in single-process order;
        None on the other ranks.
    result : dict or None
        Compress, rank 0: :func:`~lazarus_core.overlay.compute.write_overlay`'s result over all ranks (the
        config records ``distributed``); None for a compute and on the other ranks.
    """

    plan: OverlayPlan
    distributed: dict
    spectra: dict[tuple[int, str], ProjectionSpectrum] | None = None
    result: dict | None = None


def distributed_spectra(ckpt: MoeCheckpoint, layers: list[int], *, world: World, backend: str = "auto",
                        progress: bool = False, base_method: str = "refined", cache_dir: str | Path | None = None,
                        fingerprint: dict | None = None
                        ) -> tuple[dict[tuple[int, str], ProjectionSpectrum] | None, dict[int, list[int]]]:
    """:func:`~lazarus_core.overlay.compute.compute_spectra` with the layers dealt round robin over ``world``.

    Returns
    -------
    spectra : dict or None
        Rank 0: every layer's spectra (bases dropped), ordered as one process orders them; None elsewhere.
    assignment : dict
        ``rank -> [layers]``.

    Raises
    ------
    RankFailed
        On every rank when any rank failed.
    """
    use_local_gpu()  # --device cuda: each rank's own GPU
    assignment = assign_round_robin(layers, world.world_size)
    mine = on_every_rank(world, "distributed spectra", lambda: compute_spectra(
        ckpt, assignment[world.rank], backend=backend, progress=progress and world.is_root, base_method=base_method,
        cache_dir=cache_dir, fingerprint=fingerprint))
    parts = world.gather(mine)
    if not world.is_root:
        return None, assignment
    joined = {key: sp for part in parts for key, sp in part.items()}
    return {(layer, p): joined[(layer, p)] for layer in layers for p in PROJECTIONS}, assignment


def _record(assignment: dict[int, list[int]], world: World) -> dict:
    return {"world_size": world.world_size, "assignment": {str(r): v for r, v in assignment.items()}}


def plan_overlay_distributed(ckpt: MoeCheckpoint, layers: list[int], policy: RankPolicy, *, world: World,
                             dtype: str = "bf16", backend: str = "auto", progress: bool = False,
                             model_name: str | None = None, base_method: str = "refined",
                             base_dtype: str | None = None, cache_dir: str | Path | None = None,
                             fingerprint: dict | None = None) -> DistributedOverlay:
    """moe-overlay-compute over ``world``: the spectra split by layer, the plan made on rank 0 and sent to all.

    Parameters are those of :func:`~lazarus_core.overlay.compute.plan_overlay` (``world``: the job) and, for a
    compress, the plan cache and fingerprint of :func:`~lazarus_core.overlay.compute.compute_spectra`.
    """
    t0 = time.perf_counter()
    spectra, assignment = distributed_spectra(ckpt, layers, world=world, backend=backend, progress=progress,
                                              base_method=base_method, cache_dir=cache_dir, fingerprint=fingerprint)

    def plan() -> OverlayPlan | None:
        if not world.is_root:
            return None
        made = plan_overlay(ckpt, layers, policy, dtype=dtype, spectra=spectra, model_name=model_name,
                            base_method=base_method, base_dtype=base_dtype)
        if cache_dir is None:  # like a compute, whose plan_overlay times its own spectra (a compress's does not)
            made.seconds = time.perf_counter() - t0
        return made

    made = world.broadcast(on_every_rank(world, "distributed overlay plan (rank 0)", plan))
    return DistributedOverlay(made, _record(assignment, world), spectra)


def compress_overlay_distributed(ckpt: MoeCheckpoint, layers: list[int], policy: RankPolicy, out_dir: str | Path, *,
                                 world: World, model: str, revision: str | None = None, dtype: str = "bf16",
                                 base_method: str = "refined", base_dtype: str | None = None, backend: str = "auto",
                                 resume: bool = True, full_hash: bool = False, progress: bool = False
                                 ) -> DistributedOverlay:
    """moe-overlay-compress over ``world`` into ONE overlay directory with one config.

    Rank 0 checks ``out_dir`` (:func:`~lazarus_core.overlay.compute.prepare_overlay_dir`; ``resume=False``
    clears it) and fingerprints the source; each rank computes its layers' spectra (saved in
    ``out_dir/plan-cache``, or read back from there), rank 0 plans over all layers, each rank writes its layers'
    shards, and rank 0 writes the config, recording ``"distributed"``. Every rank calls this with the same
    arguments; ``out_dir`` must be on a file system every rank sees.

    Parameters
    ----------
    ckpt, layers, policy, model, revision, dtype, base_method, base_dtype, backend, full_hash, progress
        As :func:`~lazarus_core.overlay.compute.plan_overlay` and :func:`~lazarus_core.overlay.compute.write_overlay`.
    out_dir : str or Path
    world : World
    resume : bool
        Keep (and reuse) the plans and shards already in ``out_dir`` (default); False starts over.

    Returns
    -------
    DistributedOverlay

    Raises
    ------
    RankFailed
        On every rank when any rank failed; the plans and shards written so far are kept for a rerun.
    """
    out = Path(out_dir)

    def prepare() -> dict | None:
        if not world.is_root:
            return None
        previous = prepare_overlay_dir(ckpt, out, model=model, dtype=dtype, base_method=base_method,
                                       base_dtype=base_dtype, resume=resume, full_hash=full_hash)
        return overlay_fingerprint(ckpt, layers, previous, full_hash=full_hash)

    fingerprint = world.broadcast(on_every_rank(world, "distributed compress (checking --out on rank 0)", prepare))
    job = plan_overlay_distributed(ckpt, layers, policy, world=world, dtype=dtype, backend=backend, progress=progress,
                                   model_name=model, base_method=base_method, base_dtype=base_dtype,
                                   cache_dir=out / PLAN_DIR, fingerprint=fingerprint)
    mine = job.distributed["assignment"][str(world.rank)]
    shards = on_every_rank(world, "distributed compress (writing shards)", lambda: write_overlay(
        ckpt, out, job.plan, model=model, revision=revision, backend=backend, resume=True,
        progress=progress and world.is_root, full_hash=full_hash, fingerprint=fingerprint, only_layers=mine))
    done = world.gather((shards["written_layers"], shards["resumed_layers"]))

    def config() -> dict | None:
        if not world.is_root:
            return None
        result = write_overlay(ckpt, out, job.plan, model=model, revision=revision, backend=backend, resume=True,
                               full_hash=full_hash, fingerprint=fingerprint)  # every shard is current: config only
        result["config"]["distributed"] = job.distributed
        atomic_write_json(out / CONFIG_NAME, result["config"])
        result["written_layers"] = sorted(x for w, _ in done for x in w)
        result["resumed_layers"] = sorted(x for _, r in done for x in r)
        return result

    job.result = on_every_rank(world, "distributed compress (config on rank 0)", config)
    return job


__all__ = ["DistributedOverlay", "compress_overlay_distributed", "distributed_spectra", "plan_overlay_distributed"]
