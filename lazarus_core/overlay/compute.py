"""Plan an overlay (spectra -> ranks -> bytes and errors) and write it: the engine behind the
moe-overlay-estimate / -compute / -compress commands.

Each expert's delta from the mean is factored exactly at its rank r through the float64 Gram matrix of
its smaller side (eigh): A = U_r, B = U_r^T delta (or B = V_r^T, A = delta V_r), the best rank-r
approximation (Eckart-Young) at the cost of one small symmetric eigensolve, the same route as the spectra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from lazarus_core.atomic_io import atomic_write_json, check_output_dir
from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint
from lazarus_core.overlay.fingerprint import OverlaySourceMismatch, layer_digest, source_fingerprint, source_mismatch
from lazarus_core.overlay.format import (CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, read_config, shard_name,
                                         tensor_name, write_layer_shard)
from lazarus_core.overlay.plan_cache import PLAN_DIR, load_layer_plan, save_layer_plan
from lazarus_core.overlay.ranks import RankPolicy, choose_ranks
from lazarus_core.overlay.sizes import DTYPES, ByteReport, byte_report, expert_bytes_as_stored, overlay_projection_bytes
from lazarus_core.spectra import ProjectionSpectrum, error_summary, noise_edges, overlay_base, projection_spectrum
from lazarus_core.spectra.parallel import low_rank_parts


@dataclass
class ProjectionPlan:
    """Rank, bytes and predicted reconstruction error of one (layer, projection)."""

    layer: int
    projection: str
    shape: list[int]
    rank: int
    max_rank: int
    captured_energy: float
    error: dict[str, float]
    overlay_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OverlayPlan:
    """The result of planning; ``to_dict()`` is the JSON of moe-overlay-compute."""

    model: str
    family: str
    num_experts: int
    top_k: int
    layers: list[int]
    policy: RankPolicy
    dtype: str
    projections: list[ProjectionPlan]
    bytes: ByteReport
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    base_method: str = "refined"
    base_dtype: str | None = None

    def ranks(self) -> dict[tuple[int, str], int]:
        return {(p.layer, p.projection): p.rank for p in self.projections}

    def to_dict(self) -> dict:
        return {"model": self.model, "family": self.family, "num_experts": self.num_experts, "top_k": self.top_k,
                "layers": self.layers, "policy": self.policy.to_dict(), "policy_description": self.policy.describe(),
                "dtype": self.dtype, "base_method": self.base_method, "base_dtype": self.base_dtype or self.dtype,
                "projections": [p.to_dict() for p in self.projections],
                "bytes": self.bytes.to_dict(), "seconds": self.seconds, "notes": self.notes}


def activation_of(ckpt: MoeCheckpoint) -> tuple[str, float, float]:
    """``(activation, alpha, limit)`` of the family's expert MLP.

    Raises
    ------
    ValueError
        An activation the overlay kernels do not implement.
    """
    if ckpt.family == "gpt_oss":
        return "gpt_oss", float(ckpt.config.get("swiglu_alpha", 1.702)), float(ckpt.config.get("swiglu_limit", 7.0))
    act = ckpt.spec.expert_activation  # hidden_act; DBRX ffn_config.ffn_act_fn.name
    if act not in ("silu", "swish"):
        raise ValueError(f"{ckpt.source.name}: expert activation {act!r} is not supported by the overlay (SwiGLU only)")
    return "swiglu", 1.702, 7.0


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[str | None], None]]:
    """Yields ``advance(description=None)``; a rich progress bar when ``enabled``."""
    if not enabled:
        yield lambda description=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(desc: str | None = None) -> None:
            bar.advance(task)
            if desc:
                bar.update(task, description=desc)

        yield advance


def plan_key(ckpt: MoeCheckpoint, fingerprint: dict, layer: int, base_method: str) -> dict:
    """Identity of one layer's saved plan: the source layer's fingerprint digest and the base method."""
    return {"source": layer_digest(ckpt, fingerprint, layer), "base_method": base_method}


def compute_spectra(ckpt: MoeCheckpoint, layers: list[int], *, backend: str = "auto", progress: bool = False,
                    base_method: str = "refined", keep_base: bool = False, cache_dir: str | Path | None = None,
                    fingerprint: dict | None = None) -> dict[tuple[int, str], ProjectionSpectrum]:
    """Delta spectra (from the ``base_method`` base) of every (layer, projection) in ``layers``.

    Parameters
    ----------
    ckpt : MoeCheckpoint
    layers : list of int
    backend : str
    progress : bool
    base_method : {"refined", "mean"}
    keep_base : bool
        Keep each projection's base (fp32 ``[out, in]``) on ``ProjectionSpectrum.base``; otherwise ``base`` is None
        (the bases of every layer held at once would cost ``4 * out * in`` bytes per projection and layer).
    cache_dir : str or Path, optional
        Plan cache (:mod:`lazarus_core.overlay.plan_cache`; ``OUT/plan-cache`` for a compress): a layer whose
        saved plan was made from the same source tensors and base method is read back instead of computed; the
        others are computed with their base and saved there, for a rerun and for :func:`write_overlay`.
    fingerprint : dict, optional
        :func:`lazarus_core.overlay.fingerprint.source_fingerprint` covering ``layers`` (computed when a
        ``cache_dir`` needs it and none is given).

    Returns
    -------
    dict
        ``(layer, projection) -> ProjectionSpectrum``.
    """
    if cache_dir is not None and fingerprint is None:
        fingerprint = source_fingerprint(ckpt, layers)
    out = {}
    per_layer = len(PROJECTIONS) * ckpt.num_experts
    with progress_bar(progress, len(layers) * per_layer, "delta spectra") as advance:
        for layer in layers:
            key = plan_key(ckpt, fingerprint, layer, base_method) if cache_dir is not None else None
            found = load_layer_plan(cache_dir, layer, key, PROJECTIONS) if cache_dir is not None else None
            if found is not None:
                for _ in range(per_layer):
                    advance(f"spectra layer {layer} (saved plan)")
            else:
                found = {p: projection_spectrum(ckpt, layer, p, backend=backend, base_method=base_method,
                                                keep_base=keep_base or cache_dir is not None,
                                                on_expert=lambda: advance(f"spectra layer {layer} {p}"))
                         for p in PROJECTIONS}
                if cache_dir is not None:
                    save_layer_plan(cache_dir, layer, found, key)
            for p, sp in found.items():
                out[(layer, p)] = sp if keep_base or sp.base is None else dataclasses.replace(sp, base=None)
    return out


def check_storage(ckpt: MoeCheckpoint, dtype: str, base_dtype: str | None = None) -> None:
    """Refuse an overlay storage this checkpoint cannot have (before any spectra are computed).

    Raises
    ------
    ValueError
        Unknown ``dtype``/``base_dtype``, or an MXFP4 base with an input size not divisible by 32.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if base_dtype not in (None, "mxfp4", *DTYPES):
        raise ValueError(f"--base-dtype must be one of {sorted(DTYPES) + ['mxfp4']}, got {base_dtype!r}")
    if base_dtype == "mxfp4":
        bad = [p for p in PROJECTIONS if ckpt.projection_shape(p)[1] % 32]
        if bad:
            raise ValueError(f"--base-dtype mxfp4 needs input sizes divisible by 32; {bad} are not")


def plan_overlay(ckpt: MoeCheckpoint, layers: list[int], policy: RankPolicy, *, dtype: str = "bf16",
                 backend: str = "auto", progress: bool = False, model_name: str | None = None,
                 spectra: dict[tuple[int, str], ProjectionSpectrum] | None = None, base_method: str = "refined",
                 base_dtype: str | None = None) -> OverlayPlan:
    """Choose ranks for ``layers`` under ``policy`` and predict bytes and errors.

    Parameters
    ----------
    ckpt : MoeCheckpoint
    layers : list of int
        MoE layers to compress (model layer indices).
    policy : RankPolicy
    dtype : {"bf16", "fp16", "fp32"}
        Overlay storage dtype.
    backend : str
        Kernel backend of the fused decode passes.
    progress : bool
    model_name : str, optional
    spectra : dict, optional
        Precomputed spectra (computed when None, from the ``base_method`` base).
    base_method : {"refined", "mean"}
        How the shared base is formed (see :func:`lazarus_core.spectra.overlay_base`).
    base_dtype : {"bf16", "fp16", "fp32", "mxfp4"}, optional
        Storage of the base (default: ``dtype``). ``"mxfp4"`` quantises the base like gpt-oss experts
        (4.25 bits/value; needs ``in`` divisible by 32).

    Returns
    -------
    OverlayPlan
        Errors are relative Frobenius errors ``||W_e - overlay_e|| / ||W_e||`` (mean and max over experts)
        predicted from the spectra (before rounding the factors to ``dtype``).
    """
    check_storage(ckpt, dtype, base_dtype)
    t0 = time.perf_counter()
    spectra = spectra if spectra is not None else compute_spectra(ckpt, layers, backend=backend, progress=progress,
                                                                  base_method=base_method)
    stored = expert_bytes_as_stored(ckpt)
    ranks = choose_ranks(policy, spectra, dtype=dtype, has_bias=ckpt.spec.expert_bias,
                         original_expert_bytes=sum(stored[layer] for layer in layers), base_dtype=base_dtype)
    projections = []
    for (layer, p), sp in spectra.items():
        r = ranks[(layer, p)]
        projections.append(ProjectionPlan(layer, p, list(sp.shape), r, sp.max_rank, sp.captured_energy(r),
                                          error_summary(sp.relative_errors(r)),
                                          overlay_projection_bytes(sp.shape, ckpt.num_experts, r,
                                                                   ckpt.spec.expert_bias, dtype, base_dtype)))
    report = byte_report(ckpt, ranks, dtype, layers, base_dtype)
    notes = []
    if report.expert_ratio < 1.0:
        notes.append(f"the overlay does not pay here: it is {1 / report.expert_ratio:.2f}x LARGER than the experts as "
                     f"stored ({report.source_storage})")
    return OverlayPlan(model_name or ckpt.source.name, ckpt.family, ckpt.num_experts, ckpt.spec.top_k, list(layers),
                       policy, dtype, projections, report, time.perf_counter() - t0, notes, base_method, base_dtype)


def _base_description(method: str) -> str:
    return ("mean of the layer's experts (per projection)" if method == "mean" else
            "refined: alternating least squares from the mean, base = mean_e(W_e - low-rank part of W_e - base)") \
        + "; A[e] @ B[e] = truncated SVD of W_e - base"


def _config(ckpt: MoeCheckpoint, plan: OverlayPlan, model: str, revision: str | None, complete: bool,
            fingerprint: dict, previous: dict | None = None) -> dict:
    """The overlay config of ``plan``, merged with the layers of ``previous`` (an earlier run into the same
    directory) that this plan does not cover; bytes and ``moe_layers`` cover the union."""
    activation, alpha, limit = activation_of(ckpt)
    planned = {str(layer) for layer in plan.layers}
    layers = {k: v for k, v in (previous or {}).get("layers", {}).items() if k not in planned}
    for pp in plan.projections:
        entry = layers.setdefault(str(pp.layer), {"shard": shard_name(pp.layer), "projections": {},
                                                  "policy_description": plan.policy.describe()})
        entry["projections"][pp.projection] = {"shape": pp.shape, "rank": pp.rank, "bias": ckpt.spec.expert_bias,
                                               "bytes": pp.overlay_bytes, "predicted_error": pp.error}
    moe_layers = sorted(int(k) for k in layers)
    ranks = {(int(k), p): int(info["rank"]) for k, v in layers.items() for p, info in v["projections"].items()}
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "source": {"model": model, "revision": revision, "kind": ckpt.source.kind,
                   "resolved": str(ckpt.source.root) if ckpt.source.root is not None else ckpt.source.name,
                   "fingerprint": fingerprint},
        "family": ckpt.family, "num_experts": ckpt.num_experts, "top_k": ckpt.spec.top_k,
        "hidden_size": ckpt.spec.hidden_size, "intermediate_size": ckpt.spec.expert_intermediate_size,
        "moe_layers": moe_layers, "source_moe_layers": list(ckpt.moe_layers),
        "activation": activation, "swiglu_alpha": alpha, "swiglu_limit": limit,
        "base": _base_description(plan.base_method),
        "base_method": plan.base_method, "base_dtype": plan.base_dtype or plan.dtype,
        "orientation": "[out, in]; expert e = base + A[e] @ B[e]",
        "dtype": plan.dtype, "policy": plan.policy.to_dict(), "policy_description": plan.policy.describe(),
        "layers": layers, "bytes": byte_report(ckpt, ranks, plan.dtype, moe_layers, plan.base_dtype).to_dict(),
        "complete": complete,
    }


def shard_metadata(ckpt: MoeCheckpoint, plan: OverlayPlan, fingerprint: dict, layer: int,
                   ranks: dict[str, int]) -> dict[str, str]:
    """The metadata of ``layer``'s shard under ``plan``: what a resumed compress compares to decide whether a
    shard is current (:func:`shard_is_current`).

    Parameters
    ----------
    ckpt : MoeCheckpoint
    plan : OverlayPlan
        Gives the storage: ``dtype`` and the base tag ``"BASE_METHOD/BASE_DTYPE"``.
    fingerprint : dict
        :func:`overlay_fingerprint` of the run; the source entry is the layer's digest in it.
    layer : int
    ranks : dict
        Projection -> rank of the layer's factors.

    Returns
    -------
    dict
        ``{"format", "layer", "dtype", "base", "ranks" (JSON), "source"}``, all str (safetensors metadata).
    """
    return {"format": FORMAT_NAME, "layer": str(layer), "dtype": plan.dtype,
            "base": f"{plan.base_method}/{plan.base_dtype or plan.dtype}", "ranks": json.dumps(ranks),
            "source": layer_digest(ckpt, fingerprint, layer)}


def shard_is_current(path: Path, want: dict[str, str]) -> bool:
    """Whether the shard at ``path`` carries the metadata ``want`` (:func:`shard_metadata`; ranks compared as
    JSON). A missing, torn or foreign file is not current: it is rewritten."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a torn or foreign file: rewrite it
        return False
    return all(meta.get(k) == v for k, v in want.items() if k != "ranks") and \
        json.loads(meta.get("ranks", "{}")) == json.loads(want["ranks"])


def planned_bases(ckpt: MoeCheckpoint, out_dir: str | Path, plan: OverlayPlan, layer: int, projections: Sequence[str],
                  fingerprint: dict, *, backend: str = "auto",
                  spectra: dict[tuple[int, str], ProjectionSpectrum] | None = None) -> dict[str, torch.Tensor]:
    """The base each of ``projections`` of ``layer`` was planned from: a ``ProjectionSpectrum.base`` in
    ``spectra``, else the one saved in ``out_dir/plan-cache`` (:func:`compute_spectra`), else formed again.

    Parameters
    ----------
    ckpt : MoeCheckpoint
    out_dir : str or Path
        The overlay directory (its plan cache is read).
    plan : OverlayPlan
        Gives ``base_method``.
    layer : int
    projections : list of str
    fingerprint : dict
        :func:`overlay_fingerprint` of the run (the plan-cache key).
    backend : str
    spectra : dict, optional
        ``(layer, projection) -> ProjectionSpectrum`` of the plan.

    Returns
    -------
    dict
        Projection -> base, float32 ``[out, in]``.
    """
    bases = {p: getattr((spectra or {}).get((layer, p)), "base", None) for p in projections}
    if any(b is None for b in bases.values()):
        saved = load_layer_plan(Path(out_dir) / PLAN_DIR, layer, plan_key(ckpt, fingerprint, layer, plan.base_method),
                                tuple(bases))
        bases = {p: b if b is not None else (saved[p].base if saved else None) for p, b in bases.items()}
    return {p: b if b is not None else  # no plan to reuse: form the base again
            overlay_base(ckpt, layer, p, method=plan.base_method, backend=backend, edges=noise_edges(ckpt, layer, p))
            for p, b in bases.items()}


def projection_factors(experts: MoeCheckpoint, layer: int, projection: str, base: torch.Tensor, rank: int, *,
                       dtype: str, backend: str = "auto", on_expert: Callable[[], None] = lambda: None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The overlay factors of every expert of ``experts`` for one (layer, projection): the truncated SVD of
    ``W_e - base`` at ``rank`` (:func:`lazarus_core.spectra.parallel.low_rank_parts`, on the ``backend``'s
    device; CPU: single-threaded workers), rounded to ``dtype``.

    Parameters
    ----------
    experts : MoeCheckpoint
        Or a view of some of its experts
        (:class:`~lazarus_core.analysis.moe_type_distributed.ExpertSubset`: one rank's share).
    layer : int
    projection : str
    base : torch.Tensor
        float32 ``[out, in]``.
    rank : int
    dtype : {"bf16", "fp16", "fp32"}
        Overlay storage dtype.
    backend : str
    on_expert : callable, optional
        Called after each expert (a progress step).

    Returns
    -------
    A, B : torch.Tensor
        ``[E, out, rank]`` and ``[E, rank, in]`` in ``dtype``, experts in order (``E``: those of ``experts``).
    """
    a_all, b_all = [], []
    for _, a, b in low_rank_parts(experts, layer, projection, base, lambda _e, _sv: rank, backend=backend):
        a_all.append(a.to(DTYPES[dtype]))
        b_all.append(b.to(DTYPES[dtype]))
        on_expert()
    return torch.stack(a_all), torch.stack(b_all)


def projection_tensors(ckpt: MoeCheckpoint, plan: OverlayPlan, layer: int, projection: str, base: torch.Tensor,
                       a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """One (layer, projection)'s tensors of the layer shard, named (:func:`~lazarus_core.overlay.format.tensor_name`)
    and stored as the overlay format has them, in this order: the base, ``A``, ``B``, the experts' bias.

    Parameters
    ----------
    ckpt : MoeCheckpoint
        Gives the experts' bias.
    plan : OverlayPlan
        Gives ``dtype`` and ``base_dtype``.
    layer : int
    projection : str
    base : torch.Tensor
        float32 ``[out, in]``.
    a, b : torch.Tensor
        :func:`projection_factors`: ``[E, out, r]`` and ``[E, r, in]`` in ``plan.dtype``, stored as given.

    Returns
    -------
    dict
        Name -> tensor: ``base`` in ``base_dtype`` (default ``dtype``), or for an MXFP4 base ``base_blocks``
        uint8 ``[out, in/32, 16]`` and ``base_scales`` uint8 ``[out, in/32]``; ``A``, ``B``; ``bias``
        ``[E, out]`` in ``dtype`` when the experts have one.
    """
    tensors = {}
    if plan.base_dtype == "mxfp4":
        from lazarus_core.ops import mxfp4_quantize

        blocks, scales = mxfp4_quantize(base.contiguous())
        tensors[tensor_name(layer, projection, "base_blocks")] = blocks
        tensors[tensor_name(layer, projection, "base_scales")] = scales
    else:
        tensors[tensor_name(layer, projection, "base")] = base.to(DTYPES[plan.base_dtype or plan.dtype])
    tensors[tensor_name(layer, projection, "A")] = a
    tensors[tensor_name(layer, projection, "B")] = b
    bias = ckpt.expert_bias(layer, projection)
    if bias is not None:
        tensors[tensor_name(layer, projection, "bias")] = bias.to(DTYPES[plan.dtype])
    return tensors


def prepare_overlay_dir(ckpt: MoeCheckpoint, out_dir: str | Path, *, model: str, dtype: str, base_method: str,
                        base_dtype: str | None = None, resume: bool = True, full_hash: bool = False) -> dict | None:
    """Check an output directory before any planning: writable, and (with ``resume``) holding nothing but an
    overlay of this source in this storage; ``resume=False`` deletes an overlay (and its plan cache) there.

    Parameters
    ----------
    ckpt : MoeCheckpoint
    out_dir : str or Path
        Created if missing.
    model : str
        How the source is named (compared with an overlay written before fingerprints).
    dtype, base_method, base_dtype : str
        The storage of this run; layers merged into one overlay share it.
    resume : bool
    full_hash : bool
        This run fingerprints every source byte (refused on resume when the overlay there was fingerprinted from
        a sample: its shards were never checked byte for byte).

    Returns
    -------
    dict or None
        The config of the overlay already there (to resume and merge with), or None.

    Raises
    ------
    FileExistsError, PermissionError
        ``out_dir`` is a file or cannot be written.
    OverlaySourceMismatch
        ``resume`` and the overlay there was made from other source tensors (its shards would be stale).
    ValueError
        ``resume`` and the overlay there has another dtype or base, predates fingerprints, or was sampled while
        ``full_hash`` is asked for.
    """
    out = check_output_dir(out_dir)
    config_path = out / CONFIG_NAME
    if not resume:
        for f in list(out.glob("overlay-layer-*.safetensors")) + [config_path]:
            f.unlink(missing_ok=True)
        shutil.rmtree(out / PLAN_DIR, ignore_errors=True)
        return None
    if not config_path.is_file():
        return None
    old = read_config(out)
    hint = "use --no-resume to replace it or choose another --out"
    for key, want in (("dtype", dtype), ("base_method", base_method), ("base_dtype", base_dtype or dtype)):
        if old.get(key, old.get("dtype")) != want:
            raise ValueError(f"{out} holds an overlay with {key} {old.get(key)!r}, this run writes {want!r} (the "
                             f"layers of one overlay share it); {hint}")
    if old["source"].get("fingerprint") is None:
        raise ValueError(f"{out} holds an overlay of {old['source'].get('model')!r} written before source "
                         f"fingerprints: its shards cannot be checked against {model}; {hint}")
    if full_hash and not old["source"]["fingerprint"].get("full_hash"):
        raise ValueError(f"{out} holds an overlay fingerprinted from a sample of the source bytes; --full-hash cannot "
                         f"vouch for its shards: use --no-resume to rewrite it with --full-hash")
    problem = source_mismatch(ckpt, old)
    if problem is not None:
        raise OverlaySourceMismatch(f"{out} holds an overlay of {old['source'].get('model')!r} that does not match "
                                    f"{model}: {problem}; its shards would be stale: {hint}")
    return old


def overlay_fingerprint(ckpt: MoeCheckpoint, layers: list[int], previous: dict | None = None, *,
                        full_hash: bool = False) -> dict:
    """The fingerprint a compress of ``layers`` records: it covers those layers and the layers of ``previous``
    (the overlay being resumed), hashed as ``previous`` was (sample or all bytes) when resuming."""
    old = (previous or {}).get("source", {}).get("fingerprint")
    full = bool(old.get("full_hash")) if old else full_hash
    all_layers = sorted(set(layers) | {int(k) for k in (previous or {}).get("layers", {})})
    return source_fingerprint(ckpt, all_layers, full_hash=full)


def write_overlay(ckpt: MoeCheckpoint, out_dir: str | Path, plan: OverlayPlan, *, model: str, revision: str | None = None,
                  backend: str = "auto", resume: bool = True, progress: bool = False,
                  spectra: dict[tuple[int, str], ProjectionSpectrum] | None = None, full_hash: bool = False,
                  fingerprint: dict | None = None, only_layers: list[int] | None = None) -> dict:
    """Factor every planned (layer, projection) and write the overlay checkpoint to ``out_dir``.

    Parameters
    ----------
    ckpt : MoeCheckpoint
    out_dir : str or Path
        Created if missing. With ``resume`` (default) layer shards already written from the same source tensors
        for the SAME plan (ranks, dtype, base) are kept, and the layers of an earlier run into ``out_dir`` that
        this plan does not cover stay in the overlay (one config covers both; ``complete`` once every layer is
        written). ``resume=False`` deletes an existing overlay and plan cache there first.
    plan : OverlayPlan
    model, revision : str
        How the source model was named (recorded so the overlay can find it again).
    backend : str
    resume, progress : bool
    spectra : dict, optional
        The spectra the plan was made from; a ``ProjectionSpectrum.base`` there is reused, else the base saved
        in ``out_dir/plan-cache`` by :func:`compute_spectra`, else the base is recomputed.
    full_hash : bool
        Fingerprint every byte of the source experts (default: a deterministic sample,
        :mod:`lazarus_core.overlay.fingerprint`).
    fingerprint : dict, optional
        The :func:`overlay_fingerprint` of this run, when the caller computed it already.
    only_layers : list of int, optional
        Write only these planned layers' shards and no config: one rank's share of a distributed compress
        (:mod:`lazarus_core.overlay.distributed`); rank 0 then writes the config by a call without it.

    Returns
    -------
    dict
        ``{"path", "written_layers", "resumed_layers", "missing_layers", "config"}``; ``missing_layers``: layers
        of an earlier run that are in the config but not written yet (the overlay is not complete).

    Raises
    ------
    ValueError
        ``out_dir`` holds an overlay of another dtype or base and ``resume`` is on (use ``--no-resume``).
    OverlaySourceMismatch
        ``out_dir`` holds an overlay made from other source tensors and ``resume`` is on.
    """
    out = Path(out_dir)
    config_path = out / CONFIG_NAME
    previous = prepare_overlay_dir(ckpt, out, model=model, dtype=plan.dtype, base_method=plan.base_method,
                                   base_dtype=plan.base_dtype, resume=resume, full_hash=full_hash)
    fingerprint = fingerprint or overlay_fingerprint(ckpt, plan.layers, previous, full_hash=full_hash)
    if only_layers is None:
        atomic_write_json(config_path, _config(ckpt, plan, model, revision, False, fingerprint, previous))
    written, resumed = [], []
    by_layer: dict[int, list] = {}
    for pp in plan.projections:
        if only_layers is None or pp.layer in only_layers:
            by_layer.setdefault(pp.layer, []).append(pp)
    with progress_bar(progress, len(plan.projections) * ckpt.num_experts, "compress") as advance:
        for layer, pps in by_layer.items():
            meta = shard_metadata(ckpt, plan, fingerprint, layer, {pp.projection: pp.rank for pp in pps})
            if resume and shard_is_current(out / shard_name(layer), meta):
                resumed.append(layer)
                for _ in range(len(pps) * ckpt.num_experts):
                    advance(f"layer {layer} (resumed)")
                continue
            bases = planned_bases(ckpt, out, plan, layer, [pp.projection for pp in pps], fingerprint,
                                  backend=backend, spectra=spectra)
            tensors = {}
            for pp in pps:
                a, b = projection_factors(ckpt, layer, pp.projection, bases[pp.projection], pp.rank, dtype=plan.dtype,
                                          backend=backend, on_expert=lambda: advance(f"layer {layer} {pp.projection}"))
                tensors.update(projection_tensors(ckpt, plan, layer, pp.projection, bases[pp.projection], a, b))
            write_layer_shard(out, layer, tensors, meta)
            written.append(layer)
    if only_layers is not None:
        return {"path": str(out), "written_layers": written, "resumed_layers": resumed, "missing_layers": [],
                "config": None}
    missing = []
    for key, entry in (previous or {}).get("layers", {}).items():
        layer = int(key)
        if layer in by_layer:
            continue
        ranks = {p: int(info["rank"]) for p, info in entry["projections"].items()}
        if not shard_is_current(out / entry["shard"], shard_metadata(ckpt, plan, fingerprint, layer, ranks)):
            missing.append(layer)
    config = _config(ckpt, plan, model, revision, not missing, fingerprint, previous)
    atomic_write_json(config_path, config)
    return {"path": str(out), "written_layers": written, "resumed_layers": resumed, "missing_layers": sorted(missing),
            "config": config}


__all__ = ["OverlayPlan", "ProjectionPlan", "activation_of", "check_storage", "compute_spectra", "plan_key", "plan_overlay",
           "overlay_fingerprint", "planned_bases", "prepare_overlay_dir", "projection_factors",
           "projection_tensors", "shard_is_current", "shard_metadata", "write_overlay"]
