"""What a moe-type job will cost before it starts: the files and bytes it needs, how long it will take, how much
memory it holds. Reads only ``config.json`` and ``model.safetensors.index.json`` (for a hub model those two files
are the only ones fetched, plus the hub's file listing for sizes), and times the engine's per-expert work on this
machine.

Accounting, stated once:
- files: ``config.json``, the index (when there is one) and the weight files holding a routed-expert tensor of a
  requested layer (tensor names under ``spec.names.moe_prefix(layer) + "experts."`` in the index's weight map;
  the single ``model.safetensors`` when there is no index). Sizes come from disk, the hub cache or the hub's file
  listing; ``None`` (unknown) offline for files not cached, never guessed.
- expert bytes: the requested layers' routed-expert tensors as stored, from the config's shapes and storage:
  MXFP4 4.25 bits/value (codes + one scale byte per 32), FP8 1 byte/value + fp32 block scales, otherwise the
  config's dtype; expert biases included.
- time: experts x projections x layers x the measured per-expert cost of the engine's whole projection pass
  (``expert_structure.analyze_projection``: mean, spectra, the refined base's iterations, the compressor rank,
  the cosine pass, decoding) on a temporary checkpoint of 3 random bf16 experts of the model's ``[I, H]``
  shape on this machine (median of ``repeats`` runs; the down projection, with the same Gram size, is counted
  at the same cost), divided by the number of processes. On the built-in models and an OLMoE-shaped layer the
  spectra alone (``singular_values``) were 5.5-6.8x below the real run, so they are not the measure.
- peak memory, per process, for the largest projection ``[out, in]`` (r = min(out, in)): 6 float32 experts (mean,
  delta, refined base, the cosine pass's row chunks, decode), one stored expert's raw bytes, 5 float64 ``[r, r]``
  (the Gram, the eigensolver's copy and eigenvectors) and one float64 ``[r, 512]`` column chunk. Calibrated on the
  measured peak (VmHWM growth) of ``analyze_projection`` with the refined base, 12 bf16 experts: 31.7 MiB at
  [512, 2048] and 57.7 MiB at [1024, 1024] against 36 and 66 MiB from this formula; 6.0 against 10 MiB at
  [256, 1024] with 8 experts (small shapes: the formula is an upper bound). The Python / torch baseline of the process
  (a few hundred MB) is not in it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from lazarus_core.models.checkpoint import PROJECTIONS
from lazarus_core.models.errors import CheckpointError, ModelNotFoundError
from lazarus_core.models.families import FamilySpec, detect_family
from lazarus_core.models.resolve import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, ModelSource, hub_offline, resolve_model
from lazarus_core.spectra.linalg import GRAM_CHUNK

_FLOAT_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float32": 4, "fp32": 4, "float": 4}
_TIMINGS: dict[tuple, float] = {}
CALIBRATION_EXPERTS = 3  # experts of the temporary checkpoint the per-expert cost is measured on


@dataclass
class FileNeed:
    """One file a job needs: its name, size in bytes (None when unknown) and whether it is already local."""

    name: str
    size: int | None
    local: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelEstimate:
    """Cost of a moe-type job on one model, known before any weight file is read. ``to_dict()`` is its JSON.

    Attributes
    ----------
    files : list of FileNeed
        config, index (if any) and the weight files holding the requested layers' experts, in that order.
    weight_files_total : int
        Weight files of the whole checkpoint (1 without an index).
    bytes_needed, bytes_to_download : int or None
        Sum of the sizes of ``files``, and of those not yet local; None when a size is unknown.
    expert_bytes : int
        The requested layers' routed-expert tensors as stored (module docstring).
    expert_steps : int
        Experts x projections x layers: the number of per-expert projection passes.
    seconds_per_expert : dict
        Projection -> measured median seconds of one expert's projection pass.
    seconds : float
        Estimated wall time with ``nproc`` processes.
    peak_memory_bytes : int
        Working memory of one process; ``peak_memory_bytes_total`` is that times ``nproc``.
    """

    model: str
    family: str
    num_experts: int
    top_k: int
    layers: list[int]
    storage: str
    projection_shapes: dict[str, list[int]]
    files: list[FileNeed]
    weight_files_total: int
    bytes_needed: int | None
    bytes_to_download: int | None
    expert_bytes: int
    expert_steps: int
    seconds_per_expert: dict[str, float]
    seconds: float
    nproc: int
    device: str
    peak_memory_bytes: int
    peak_memory_bytes_total: int
    timing: dict = field(default_factory=dict)

    @property
    def weight_files(self) -> list[FileNeed]:
        """The weight files among :attr:`files` (not config or index)."""
        return [f for f in self.files if f.name not in (CONFIG_NAME, INDEX_NAME)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = [f.to_dict() for f in self.files]
        return d


def expert_tensor_names(weight_map: dict[str, str], spec: FamilySpec, layers: Sequence[int]) -> dict[int, list[str]]:
    """Per requested layer, the names in ``weight_map`` of its routed-expert tensors (weights, scales, biases).

    Parameters
    ----------
    weight_map : dict
        Tensor name -> file name (an index's ``weight_map``, or a single file's tensor names).
    spec : FamilySpec
    layers : sequence of int
        MoE layer indices.

    Returns
    -------
    dict
        ``layer -> [tensor name, ...]`` (names under ``spec.names.moe_prefix(layer) + "experts."``, in map order).
    """
    prefixes = {layer: spec.names.moe_prefix(layer) + "experts." for layer in layers}
    out: dict[int, list[str]] = {layer: [] for layer in layers}
    for name in weight_map:
        for layer, prefix in prefixes.items():
            if name.startswith(prefix):
                out[layer].append(name)
    return out


def storage_from_config(spec: FamilySpec, config: dict) -> tuple[str, float]:
    """``(storage name, bytes per value)`` the config declares for the routed experts.

    ``"mxfp4"`` 4.25 bits, ``"fp8_e4m3"`` 1 byte (+ block scales, counted by :func:`expert_bytes_from_config`),
    else the config's ``dtype`` / ``torch_dtype`` (default bf16).
    """
    if spec.quantization == "mxfp4":
        return "mxfp4", 4.25 / 8
    if spec.quantization == "fp8":
        return "fp8_e4m3", 1.0
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    if dtype not in _FLOAT_BYTES:
        raise ValueError(f"config.json: dtype {dtype!r} is not one of {sorted(_FLOAT_BYTES)}")
    return {2: "bf16" if "b" in dtype else "fp16", 4: "fp32"}[_FLOAT_BYTES[dtype]], float(_FLOAT_BYTES[dtype])


def projection_shapes(spec: FamilySpec) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of one routed expert's projections: gate/up ``[I, H]``, down ``[H, I]``."""
    h, i = spec.hidden_size, spec.expert_intermediate_size
    return {p: ((h, i) if p == "down" else (i, h)) for p in PROJECTIONS}


def expert_bytes_from_config(spec: FamilySpec, config: dict, n_layers: int) -> int:
    """Bytes of ``n_layers`` MoE layers' routed-expert tensors as stored, from the config alone (module docstring)."""
    storage, per_value = storage_from_config(spec, config)
    per_layer = 0
    for out_dim, in_dim in projection_shapes(spec).values():
        values = out_dim * in_dim
        per_layer += math.ceil(values * per_value)
        if storage == "fp8_e4m3":
            br, bc = spec.fp8_block_size or (128, 128)
            per_layer += 4 * math.ceil(out_dim / br) * math.ceil(in_dim / bc)  # fp32 weight_scale_inv
    per_layer *= spec.num_experts
    if spec.expert_bias:
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
        per_layer += spec.num_experts * (2 * spec.expert_intermediate_size + spec.hidden_size) * \
            _FLOAT_BYTES.get(dtype, 2)
    return per_layer * n_layers


def working_memory_bytes(shape: tuple[int, int], stored_bytes_per_value: float) -> int:
    """Peak working memory of one process analysing one ``[out, in]`` projection (module docstring)."""
    out_dim, in_dim = shape
    r = min(out_dim, in_dim)
    values = out_dim * in_dim
    return 6 * values * 4 + math.ceil(values * stored_bytes_per_value) + 5 * r * r * 8 + r * GRAM_CHUNK * 8


def expert_seconds(shape: tuple[int, int], *, device: str = "cpu", repeats: int = 1,
                   base_method: str = "refined") -> float:
    """Measured wall time per expert of the engine's projection pass (``analyze_projection``) for ``[out, in]``.

    Runs the pass on a temporary checkpoint of :data:`CALIBRATION_EXPERTS` random bf16 experts of that shape
    (written to the system's temporary directory, removed afterwards), after a warm-up on a tiny one; measured
    once per (shape, base_method, repeats) in a process and remembered.

    Parameters
    ----------
    shape : (int, int)
        ``[out, in]`` of one expert's gate/up projection (``[I, H]``).
    device : str
        Where the measured pass runs its Grams and eigensolves (``analyze_projection(device=...)``: the CPU's
        single-threaded workers on every core, or batched on a device such as "cuda").
    repeats : int
        Timed passes (>= 1); the median is returned.
    base_method : {"refined", "mean"}
        The compressor base the pass uses.

    Returns
    -------
    float
        Seconds per expert and projection.
    """
    from lazarus_core.analysis.expert_structure import spectrum_passes

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    from lazarus_core.spectra.parallel import resolve_device

    device = str(resolve_device(device))  # validates (a CUDA device must exist)
    spectrum_passes(base_method)  # validates
    key = (tuple(shape), base_method, repeats, device)
    if key not in _TIMINGS:
        _projection_pass_seconds((8, 32), base_method, device)  # warm-up: imports, allocator pools, LAPACK workspaces
        _TIMINGS[key] = statistics.median(_projection_pass_seconds(tuple(shape), base_method, device)
                                          for _ in range(repeats)) / CALIBRATION_EXPERTS
    return _TIMINGS[key]


def _projection_pass_seconds(shape: tuple[int, int], base_method: str, device: str = "cpu") -> float:
    """Wall time of one ``analyze_projection`` of the up projection over a random temporary checkpoint."""
    import json
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from lazarus_core.analysis.expert_structure import analyze_projection
    from lazarus_core.models.checkpoint import open_moe_checkpoint

    inter, hidden = shape
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="lazarus-estimate-") as tmp:
        root = Path(tmp)
        (root / CONFIG_NAME).write_text(json.dumps({
            "model_type": "olmoe", "num_hidden_layers": 1, "hidden_size": hidden, "intermediate_size": inter,
            "num_experts": CALIBRATION_EXPERTS, "num_experts_per_tok": 1}))
        save_file({f"model.layers.0.mlp.experts.{e}.{name}_proj.weight":
                   torch.randn(dims, generator=generator).to(torch.bfloat16)
                   for e in range(CALIBRATION_EXPERTS)
                   for name, dims in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))},
                  str(root / SINGLE_NAME))
        with open_moe_checkpoint(root) as ckpt:
            t0 = time.perf_counter()
            analyze_projection(ckpt, 0, "up", base_method=base_method, device=device)
            return time.perf_counter() - t0


def needed_files(source: ModelSource, spec: FamilySpec, layers: Sequence[int]) -> tuple[list[FileNeed], int]:
    """The files a job on ``layers`` reads, without fetching any weight file, and the checkpoint's weight-file count.

    Returns
    -------
    (list of FileNeed, int)
        config, index (if present) and the weight files holding the layers' expert tensors; total weight files.

    Raises
    ------
    CheckpointError
        The index names no expert tensor for a requested layer (names the index).
    ModelNotFoundError
        Offline, and the index of a hub model is not cached (which files are needed cannot be known).
    """
    wmap = source.index_weight_map()
    names = [CONFIG_NAME]
    if wmap is None and source.kind == "hub" and hub_offline() and source.cached_path(SINGLE_NAME) is None:
        raise ModelNotFoundError(f"{source.describe(INDEX_NAME)}: not in the local Hugging Face cache and "
                                 f"HF_HUB_OFFLINE=1 forbids fetching it, so the files this job needs are unknown")
    if wmap is None:
        names.append(SINGLE_NAME)
        total = 1
    else:
        names.append(INDEX_NAME)
        per_layer = expert_tensor_names(wmap, spec, layers)
        empty = [layer for layer, tensors in per_layer.items() if not tensors]
        if empty:
            raise CheckpointError(f"{source.describe(INDEX_NAME)}: no routed-expert tensor of layer(s) {empty} "
                                  f"(expected names under {spec.names.moe_prefix(empty[0])}experts.)")
        shards = {wmap[name] for tensors in per_layer.values() for name in tensors}
        names.extend(sorted(shards))
        total = len(set(wmap.values()))
    return [FileNeed(n, source.file_size(n), source.cached_path(n) is not None) for n in names], total


def estimate_moe_type(model: str, layers: str | Sequence[int] | None = None, *, revision: str | None = None,
                      nproc: int = 1, device: str = "cpu", repeats: int = 1, base_method: str = "refined"
                      ) -> ModelEstimate:
    """Files, bytes, time and memory of ``moe-type-analyze`` on ``model``, without reading any weight file.

    Parameters
    ----------
    model : str
        Local directory, built-in alias or Hugging Face id (only config and index are fetched).
    layers : str or sequence of int, optional
        ``"all"`` / ``None`` (every MoE layer), ``"0,3,7"``, or a list of MoE layer indices.
    revision : str, optional
        Hub revision.
    nproc : int
        Processes the job is split over (time divides by it, memory multiplies).
    device : str
        Device the per-expert cost is measured on.
    repeats : int
        Timed passes of the per-expert cost (median).
    base_method : {"refined", "mean"}
        The analysis's compressor base (the refined one costs several more passes per expert).

    Returns
    -------
    ModelEstimate
    """
    from lazarus_core.analysis.expert_structure import parse_layers

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    source = resolve_model(model, revision=revision)
    config = source.read_json(CONFIG_NAME)
    spec = detect_family(config)
    layer_list = parse_layers(layers if layers is None or isinstance(layers, str) else ",".join(map(str, layers)),
                              spec.moe_layers)
    files, total = needed_files(source, spec, layer_list)
    storage, per_value = storage_from_config(spec, config)
    shapes = projection_shapes(spec)
    measured = expert_seconds(shapes["up"], device=device, repeats=repeats, base_method=base_method)
    per_expert = {p: measured for p in shapes}
    steps = len(layer_list) * spec.num_experts
    seconds = steps * sum(per_expert.values()) / nproc
    sizes = [f.size for f in files]
    unknown = any(s is None for s in sizes)
    peak = max(working_memory_bytes(shape, per_value) for shape in shapes.values())
    return ModelEstimate(
        model=model, family=spec.family, num_experts=spec.num_experts, top_k=spec.top_k, layers=layer_list,
        storage=storage, projection_shapes={p: list(s) for p, s in shapes.items()}, files=files,
        weight_files_total=total, bytes_needed=None if unknown else sum(sizes),
        bytes_to_download=None if unknown else sum(f.size for f in files if not f.local),
        expert_bytes=expert_bytes_from_config(spec, config, len(layer_list)), expert_steps=steps * len(shapes),
        seconds_per_expert=per_expert, seconds=seconds, nproc=nproc, device=str(device), peak_memory_bytes=peak,
        peak_memory_bytes_total=peak * nproc,
        timing={"what": f"analyze_projection (the whole per-projection pass, base {base_method!r}) on "
                         f"{CALIBRATION_EXPERTS} random bf16 experts of shape {list(shapes['up'])}, per expert",
                "base_method": base_method, "repeats": repeats, "statistic": "median", "device": str(device),
                "threads": torch.get_num_threads()},
    )
