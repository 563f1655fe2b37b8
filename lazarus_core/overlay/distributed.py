"""moe-overlay-compute and -compress over the ranks of a torch.distributed job (``torchrun ... lazarus
introspect moe-expert moe-overlay-compress``): the layers are dealt to the ranks, each computes its layers'
spectra and writes their plan-cache entries and shards into the one ``--out`` directory, and rank 0 chooses
the ranks from every layer's spectra (a ``--target-ratio`` is global) and writes the one config.

With fewer layers than ranks the experts of each layer are split over the ranks sharing it, by
moe-type-analyze's rule (:func:`~lazarus_core.analysis.moe_type_distributed.moe_type_assignment`). Spectra:
every rank of a layer's group forms the layer's base from all its experts, then the spectra of its contiguous
expert range only (:func:`~lazarus_core.analysis.moe_type_distributed.projection_share`); rank 0 joins them
in expert order into the layer's spectra and, for a compress, saves them with the base as the layer's
ordinary plan-cache entry. Shard: each rank factors its experts at the planned ranks (the base read back from
that plan-cache entry) and sends the factors to rank 0, which writes the layer's shard: the tensors and
metadata one process writes. ``distributed`` then also records ``"experts": {"RANK": [first, last]}``.

A rank that fails stops every rank (:func:`lazarus_core.distributed.on_every_rank`); what the ranks wrote is
the ordinary resumable state of a compress (``plan-cache/`` entries and current layer shards), so rerunning
the same command, with any number of ranks, reuses it. An expert split adds one thing: each rank keeps its
finished share of a layer's spectra, with the layer's base, in ``plan-cache/share-LLLLL/experts-START-STOP/``
(a plan of those experts, same key plus the range) until rank 0 has saved the layer's plan, so a rerun with
the same number of ranks does not compute it again; the factors are not kept (a failure while factoring
costs the rerun the factors of that layer, not its spectra: one eigensolve per expert).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lazarus_core.analysis.moe_type_distributed import (ExpertSubset, distributed_record, join_spectra,
                                                        moe_type_assignment, projection_share)
from lazarus_core.atomic_io import atomic_write_json
from lazarus_core.distributed import World, on_every_rank, use_local_gpu
from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint
from lazarus_core.overlay.compute import (OverlayPlan, ProjectionPlan, compute_spectra, overlay_fingerprint, plan_key,
                                          plan_overlay, planned_bases, prepare_overlay_dir, progress_bar,
                                          projection_factors, projection_tensors, shard_is_current, shard_metadata,
                                          write_overlay)
from lazarus_core.overlay.fingerprint import source_fingerprint
from lazarus_core.overlay.format import CONFIG_NAME, shard_name, write_layer_shard
from lazarus_core.overlay.plan_cache import PLAN_DIR, load_layer_plan, save_layer_plan
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
        ``{"world_size": N, "assignment": {"RANK": [layers...]}}``, plus ``"experts": {"RANK": [first, last]}``
        (``[]``: no experts) when the experts of a layer are split (fewer layers than ranks).
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
                        ) -> tuple[dict[tuple[int, str], ProjectionSpectrum] | None, dict]:
    """:func:`~lazarus_core.overlay.compute.compute_spectra` with the work split over ``world``: the layers round
    robin, or, with fewer layers than ranks, each layer's experts over the ranks sharing it.

    Returns
    -------
    spectra : dict or None
        Rank 0: every layer's spectra (bases dropped), ordered as one process orders them and equal to one
        process's; None elsewhere.
    distributed : dict
        The record of who computed what (:func:`~lazarus_core.analysis.moe_type_distributed.distributed_record`).

    Raises
    ------
    RankFailed
        On every rank when any rank failed.
    """
    use_local_gpu()  # --device cuda: each rank's own GPU
    layers_of, experts_of = moe_type_assignment(layers, world.world_size, ckpt.num_experts)
    record = distributed_record(layers_of, experts_of, world.world_size)
    if experts_of is not None:
        return _expert_split_spectra(ckpt, layers, layers_of[world.rank][0], experts_of[world.rank], world=world,
                                     backend=backend, progress=progress, base_method=base_method,
                                     cache_dir=cache_dir, fingerprint=fingerprint), record
    mine = on_every_rank(world, "distributed spectra", lambda: compute_spectra(
        ckpt, layers_of[world.rank], backend=backend, progress=progress and world.is_root, base_method=base_method,
        cache_dir=cache_dir, fingerprint=fingerprint))
    parts = world.gather(mine)
    if not world.is_root:
        return None, record
    joined = {key: sp for part in parts for key, sp in part.items()}
    return {(layer, p): joined[(layer, p)] for layer in layers for p in PROJECTIONS}, record


def _expert_split_spectra(ckpt: MoeCheckpoint, layers: list[int], layer: int, experts: range, *, world: World,
                          backend: str, progress: bool, base_method: str, cache_dir: str | Path | None,
                          fingerprint: dict | None) -> dict[tuple[int, str], ProjectionSpectrum] | None:
    """This rank's share (``experts`` of ``layer``) of the spectra of ``layers``, joined on rank 0, which saves
    each joined layer's plan (with its base) in ``cache_dir``; a layer whose plan is saved there is skipped."""
    if cache_dir is not None and fingerprint is None:
        fingerprint = source_fingerprint(ckpt, layers)
    keys = {x: plan_key(ckpt, fingerprint, x, base_method) for x in layers} if cache_dir is not None else {}

    def saved() -> dict[int, dict[str, ProjectionSpectrum]]:
        if not world.is_root or cache_dir is None:
            return {}
        found = {x: load_layer_plan(cache_dir, x, keys[x], PROJECTIONS) for x in layers}
        return {x: plans for x, plans in found.items() if plans is not None}

    cached = on_every_rank(world, "distributed spectra (reading the plan cache on rank 0)", saved)
    skip = world.broadcast(sorted(cached))

    def share() -> list[tuple[str, int, ProjectionSpectrum, torch.Tensor | None]]:
        if layer in skip or not experts:
            return []
        mine = _spectra_share(ckpt, layer, experts, backend=backend, base_method=base_method,
                              progress=progress and world.is_root, cache_dir=cache_dir, key=keys.get(layer))
        return [(p, experts.start, dataclasses.replace(mine[p], base=None),
                 mine[p].base if experts.start == 0 else None) for p in PROJECTIONS]  # one share sends the base

    parts = world.gather(on_every_rank(world, "distributed spectra (experts split)", share))

    def join() -> dict[tuple[int, str], ProjectionSpectrum] | None:
        if not world.is_root:
            return None
        pieces: dict[tuple[int, str], list] = {}
        for part in parts:
            for p, start, spectrum, base in part:
                pieces.setdefault((spectrum.layer, p), []).append((start, spectrum, base))
        out = {}
        for x in layers:
            plans = cached.get(x)
            if plans is None:
                plans = {}
                for p in PROJECTIONS:
                    ordered = sorted(pieces[(x, p)], key=lambda piece: piece[0])
                    plans[p] = dataclasses.replace(join_spectra([piece[1] for piece in ordered]), base=ordered[0][2])
                if cache_dir is not None:
                    save_layer_plan(cache_dir, x, plans, keys[x])
            if cache_dir is not None:  # the layer's plan is saved: its shares are done
                shutil.rmtree(_shares_of(cache_dir, x), ignore_errors=True)
            out.update({(x, p): dataclasses.replace(plans[p], base=None) for p in PROJECTIONS})
        return out

    return on_every_rank(world, "distributed spectra (joining on rank 0)", join)


def _spectra_share(ckpt: MoeCheckpoint, layer: int, experts: range, *, backend: str, base_method: str,
                   progress: bool, cache_dir: str | Path | None, key: dict | None) -> dict[str, ProjectionSpectrum]:
    """Projection -> spectra of ``experts`` of ``layer`` (from the base of all its experts, kept on ``base`` when
    there is a ``cache_dir``), saved under :func:`_shares_of` for a rerun, or read back from there."""
    where = None if cache_dir is None else _shares_of(cache_dir, layer) / f"experts-{experts.start}-{experts.stop}"
    key = {**(key or {}), "experts": [experts.start, experts.stop]}
    mine = None if where is None else load_layer_plan(where, layer, key, PROJECTIONS)
    if mine is not None:
        return mine
    mine = {}
    with progress_bar(progress, len(PROJECTIONS) * len(experts),
                      f"delta spectra layer {layer}, experts {experts.start}-{experts.stop - 1}") as step:
        for p in PROJECTIONS:
            _, spectrum, base = projection_share(ckpt, layer, p, experts, backend=backend, base_method=base_method,
                                                 mean_spectrum=False, on_expert=step)
            mine[p] = dataclasses.replace(spectrum, base=None if where is None else base)
    if where is not None:
        save_layer_plan(where, layer, mine, key)
    return mine


def _shares_of(cache_dir: str | Path, layer: int) -> Path:
    """``cache_dir/share-LLLLL``: where the ranks keep their finished shares of an expert-split layer's spectra
    (``experts-START-STOP/``, a plan of those experts, with the layer's base) until rank 0 saves the layer's plan."""
    return Path(cache_dir) / f"share-{layer:05d}"


def plan_overlay_distributed(ckpt: MoeCheckpoint, layers: list[int], policy: RankPolicy, *, world: World,
                             dtype: str = "bf16", backend: str = "auto", progress: bool = False,
                             model_name: str | None = None, base_method: str = "refined",
                             base_dtype: str | None = None, cache_dir: str | Path | None = None,
                             fingerprint: dict | None = None) -> DistributedOverlay:
    """moe-overlay-compute over ``world``: the spectra split (:func:`distributed_spectra`), the plan made on
    rank 0 and sent to all.

    Parameters are those of :func:`~lazarus_core.overlay.compute.plan_overlay` (``world``: the job) and, for a
    compress, the plan cache and fingerprint of :func:`~lazarus_core.overlay.compute.compute_spectra`.
    """
    t0 = time.perf_counter()
    spectra, record = distributed_spectra(ckpt, layers, world=world, backend=backend, progress=progress,
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
    return DistributedOverlay(made, record, spectra)


def compress_overlay_distributed(ckpt: MoeCheckpoint, layers: list[int], policy: RankPolicy, out_dir: str | Path, *,
                                 world: World, model: str, revision: str | None = None, dtype: str = "bf16",
                                 base_method: str = "refined", base_dtype: str | None = None, backend: str = "auto",
                                 resume: bool = True, full_hash: bool = False, progress: bool = False
                                 ) -> DistributedOverlay:
    """moe-overlay-compress over ``world`` into ONE overlay directory with one config.

    Rank 0 checks ``out_dir`` (:func:`~lazarus_core.overlay.compute.prepare_overlay_dir`; ``resume=False``
    clears it) and fingerprints the source; the spectra are split (:func:`distributed_spectra`; saved in
    ``out_dir/plan-cache``, or read back from there), rank 0 plans over all layers, each rank writes its layers'
    shards (expert split: factors its experts, and rank 0 writes the shard), and rank 0 writes the config,
    recording ``"distributed"``. Every rank calls this with the same arguments; ``out_dir`` must be on a file
    system every rank sees.

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
    if "experts" in job.distributed:
        done = _write_expert_split(ckpt, out, job.plan, job.distributed, world=world, fingerprint=fingerprint,
                                   backend=backend, progress=progress)
    else:
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


def _write_expert_split(ckpt: MoeCheckpoint, out: Path, plan: OverlayPlan, distributed: dict, *, world: World,
                        fingerprint: dict, backend: str, progress: bool) -> list[tuple[list[int], list[int]]] | None:
    """Expert split: each rank factors its experts of its layer, rank 0 writes every layer's shard; returns (on
    rank 0) ``[(written layers, resumed layers)]`` as the layer split gathers it."""
    by_layer: dict[int, list[ProjectionPlan]] = {}
    for pp in plan.projections:
        by_layer.setdefault(pp.layer, []).append(pp)
    metas = {layer: shard_metadata(ckpt, plan, fingerprint, layer, {pp.projection: pp.rank for pp in pps})
             for layer, pps in by_layer.items()}

    def current() -> list[int] | None:
        if not world.is_root:
            return None
        return [layer for layer in by_layer if shard_is_current(out / shard_name(layer), metas[layer])]

    resumed = world.broadcast(on_every_rank(world, "distributed compress (checking shards on rank 0)", current))
    layer = distributed["assignment"][str(world.rank)][0]
    first_last = distributed["experts"][str(world.rank)]
    experts = range(first_last[0], first_last[1] + 1) if first_last else range(0)

    bases_of: dict[int, dict] = {}  # rank 0 reuses its own layer's bases when it writes the shards

    def layer_bases(x: int) -> dict:
        if x not in bases_of:
            bases_of[x] = planned_bases(ckpt, out, plan, x, PROJECTIONS, fingerprint, backend=backend)
        return bases_of[x]

    def factors() -> list[tuple[int, str, int, torch.Tensor, torch.Tensor]]:
        if layer in resumed or not experts:
            return []
        bases = layer_bases(layer)
        view, mine = ExpertSubset(ckpt, experts), []
        with progress_bar(progress and world.is_root, len(by_layer[layer]) * len(experts),
                          f"compress layer {layer}, experts {experts.start}-{experts.stop - 1}") as step:
            for pp in by_layer[layer]:
                a, b = projection_factors(view, layer, pp.projection, bases[pp.projection], pp.rank, dtype=plan.dtype,
                                          backend=backend, on_expert=step)
                mine.append((layer, pp.projection, experts.start, a, b))
        return mine

    parts = world.gather(on_every_rank(world, "distributed compress (factoring experts)", factors))

    def shards() -> tuple[list[int], list[int]]:
        if not world.is_root:
            return [], []
        pieces: dict[tuple[int, str], list] = {}
        for part in parts:
            for x, p, start, a, b in part:
                pieces.setdefault((x, p), []).append((start, a, b))
        written = []
        for x, pps in by_layer.items():
            if x in resumed:
                continue
            bases, tensors = layer_bases(x), {}
            for pp in pps:
                ordered = sorted(pieces[(x, pp.projection)], key=lambda piece: piece[0])
                tensors.update(projection_tensors(ckpt, plan, x, pp.projection, bases[pp.projection],
                                                  torch.cat([piece[1] for piece in ordered]),
                                                  torch.cat([piece[2] for piece in ordered])))
            write_layer_shard(out, x, tensors, metas[x])
            written.append(x)
        return written, resumed

    return world.gather(on_every_rank(world, "distributed compress (writing shards on rank 0)", shards))


__all__ = ["DistributedOverlay", "compress_overlay_distributed", "distributed_spectra", "plan_overlay_distributed"]
