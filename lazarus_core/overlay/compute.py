"""Plan an overlay (spectra -> ranks -> bytes and errors) and write it: the engine behind the
moe-overlay-estimate / -compute / -compress commands.

Each expert's delta from the mean is factored exactly at its rank r through the float64 Gram matrix of
its smaller side (eigh): A = U_r, B = U_r^T delta (or B = V_r^T, A = delta V_r), the best rank-r
approximation (Eckart-Young) at the cost of one small symmetric eigensolve, the same route as the spectra.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint
from lazarus_core.overlay.format import (CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, atomic_write_text, shard_name,
                                         tensor_name, write_layer_shard)
from lazarus_core.overlay.ranks import RankPolicy, choose_ranks
from lazarus_core.overlay.sizes import DTYPES, ByteReport, byte_report, expert_bytes_as_stored, overlay_projection_bytes
from lazarus_core.spectra import (ProjectionSpectrum, error_summary, factorize, iter_deltas, noise_edges, overlay_base,
                                 projection_spectrum)


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
    act = ckpt.config.get("hidden_act", "silu")
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


def compute_spectra(ckpt: MoeCheckpoint, layers: list[int], *, backend: str = "auto", progress: bool = False,
                    base_method: str = "refined") -> dict[tuple[int, str], ProjectionSpectrum]:
    """Delta spectra (from the ``base_method`` base) of every (layer, projection) in ``layers``."""
    out = {}
    with progress_bar(progress, len(layers) * len(PROJECTIONS) * ckpt.num_experts, "delta spectra") as advance:
        for layer in layers:
            for p in PROJECTIONS:
                out[(layer, p)] = projection_spectrum(ckpt, layer, p, backend=backend, base_method=base_method,
                                                      on_expert=lambda: advance(f"spectra layer {layer} {p}"))
    return out


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
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if base_dtype not in (None, "mxfp4", *DTYPES):
        raise ValueError(f"--base-dtype must be one of {sorted(DTYPES) + ['mxfp4']}, got {base_dtype!r}")
    if base_dtype == "mxfp4":
        bad = [p for p in PROJECTIONS if ckpt.projection_shape(p)[1] % 32]
        if bad:
            raise ValueError(f"--base-dtype mxfp4 needs input sizes divisible by 32; {bad} are not")
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


def _config(ckpt: MoeCheckpoint, plan: OverlayPlan, model: str, revision: str | None, complete: bool) -> dict:
    activation, alpha, limit = activation_of(ckpt)
    layers = {}
    for pp in plan.projections:
        entry = layers.setdefault(str(pp.layer), {"shard": shard_name(pp.layer), "projections": {}})
        entry["projections"][pp.projection] = {"shape": pp.shape, "rank": pp.rank, "bias": ckpt.spec.expert_bias,
                                               "bytes": pp.overlay_bytes, "predicted_error": pp.error}
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "source": {"model": model, "revision": revision, "kind": ckpt.source.kind,
                   "resolved": str(ckpt.source.root) if ckpt.source.root is not None else ckpt.source.name},
        "family": ckpt.family, "num_experts": ckpt.num_experts, "top_k": ckpt.spec.top_k,
        "hidden_size": ckpt.spec.hidden_size, "intermediate_size": ckpt.spec.expert_intermediate_size,
        "moe_layers": plan.layers, "source_moe_layers": list(ckpt.moe_layers),
        "activation": activation, "swiglu_alpha": alpha, "swiglu_limit": limit,
        "base": ("mean of the layer's experts (per projection)" if plan.base_method == "mean" else
                 "refined: alternating least squares from the mean, base = mean_e(W_e - low-rank part of W_e - base)")
                + "; A[e] @ B[e] = truncated SVD of W_e - base",
        "base_method": plan.base_method, "base_dtype": plan.base_dtype or plan.dtype,
        "orientation": "[out, in]; expert e = base + A[e] @ B[e]",
        "dtype": plan.dtype, "policy": plan.policy.to_dict(), "policy_description": plan.policy.describe(),
        "layers": layers, "bytes": plan.bytes.to_dict(), "complete": complete,
    }


def _shard_is_current(path: Path, layer: int, plan: OverlayPlan) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a torn or foreign file: rewrite it
        return False
    want = {p.projection: p.rank for p in plan.projections if p.layer == layer}
    return meta.get("format") == FORMAT_NAME and meta.get("dtype") == plan.dtype and \
        meta.get("base") == f"{plan.base_method}/{plan.base_dtype or plan.dtype}" and \
        json.loads(meta.get("ranks", "{}")) == want


def write_overlay(ckpt: MoeCheckpoint, out_dir: str | Path, plan: OverlayPlan, *, model: str, revision: str | None = None,
                  backend: str = "auto", resume: bool = True, progress: bool = False) -> dict:
    """Factor every planned (layer, projection) and write the overlay checkpoint to ``out_dir``.

    Parameters
    ----------
    ckpt : MoeCheckpoint
    out_dir : str or Path
        Created if missing. With ``resume`` (default) layer shards already written for the SAME plan
        (ranks, dtype) are kept; ``resume=False`` deletes an existing overlay there first.
    plan : OverlayPlan
    model, revision : str
        How the source model was named (recorded so the overlay can find it again).
    backend : str
    resume, progress : bool

    Returns
    -------
    dict
        ``{"path", "written_layers", "resumed_layers", "config"}``.

    Raises
    ------
    ValueError
        ``out_dir`` holds an overlay of another model or plan and ``resume`` is on (use ``--no-resume``).
    """
    out = Path(out_dir)
    config_path = out / CONFIG_NAME
    if out.exists() and not resume:
        for f in list(out.glob("overlay-layer-*.safetensors*")) + [config_path]:
            f.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if resume and config_path.is_file():
        old = json.loads(config_path.read_text())
        if old.get("source", {}).get("model") != model or old.get("dtype") != plan.dtype:
            raise ValueError(f"{out} holds an overlay of {old.get('source', {}).get('model')!r} ({old.get('dtype')}); "
                             f"use --no-resume to replace it or choose another --out")
    atomic_write_text(config_path, json.dumps(_config(ckpt, plan, model, revision, False), indent=2))
    dtype = DTYPES[plan.dtype]
    written, resumed = [], []
    by_layer: dict[int, list] = {}
    for pp in plan.projections:
        by_layer.setdefault(pp.layer, []).append(pp)
    with progress_bar(progress, len(plan.projections) * ckpt.num_experts, "compress") as advance:
        for layer, pps in by_layer.items():
            if resume and _shard_is_current(out / shard_name(layer), layer, plan):
                resumed.append(layer)
                for _ in range(len(pps) * ckpt.num_experts):
                    advance(f"layer {layer} (resumed)")
                continue
            tensors = {}
            for pp in pps:
                base = overlay_base(ckpt, layer, pp.projection, method=plan.base_method, backend=backend,
                                    edges=noise_edges(ckpt, layer, pp.projection))
                a_all, b_all = [], []
                for _, delta in iter_deltas(ckpt, layer, pp.projection, base, backend=backend):
                    a, b = factorize(delta, pp.rank)
                    a_all.append(a.to(dtype))
                    b_all.append(b.to(dtype))
                    advance(f"layer {layer} {pp.projection}")
                if plan.base_dtype == "mxfp4":
                    from lazarus_core.ops import mxfp4_quantize

                    blocks, scales = mxfp4_quantize(base.contiguous())
                    tensors[tensor_name(layer, pp.projection, "base_blocks")] = blocks
                    tensors[tensor_name(layer, pp.projection, "base_scales")] = scales
                else:
                    tensors[tensor_name(layer, pp.projection, "base")] = base.to(DTYPES[plan.base_dtype or plan.dtype])
                tensors[tensor_name(layer, pp.projection, "A")] = torch.stack(a_all)
                tensors[tensor_name(layer, pp.projection, "B")] = torch.stack(b_all)
                bias = ckpt.expert_bias(layer, pp.projection)
                if bias is not None:
                    tensors[tensor_name(layer, pp.projection, "bias")] = bias.to(dtype)
            meta = {"format": FORMAT_NAME, "layer": str(layer), "dtype": plan.dtype,
                    "base": f"{plan.base_method}/{plan.base_dtype or plan.dtype}",
                    "ranks": json.dumps({pp.projection: pp.rank for pp in pps})}
            write_layer_shard(out, layer, tensors, meta)
            written.append(layer)
    config = _config(ckpt, plan, model, revision, True)
    atomic_write_text(config_path, json.dumps(config, indent=2))
    return {"path": str(out), "written_layers": written, "resumed_layers": resumed, "config": config}


__all__ = ["OverlayPlan", "ProjectionPlan", "activation_of", "compute_spectra", "plan_overlay",
           "write_overlay"]
