"""Classify many models in one run: moe-type-analyze on each, one summary row per model (the taxonomy table of
the reference documents), what was read for it, and a row saying why for a model that could not be analysed.

A row is read off the model's own :class:`~lazarus_core.analysis.expert_structure.MoeTypeReport` by
:func:`summary_row`, so a sweep row equals the single-model result by construction; the full reports travel in
the JSON.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from lazarus_core import BackendUnavailableError
from lazarus_core.analysis.estimate import ModelEstimate, estimate_moe_type, expert_tensor_names
from lazarus_core.analysis.expert_structure import MoeTypeReport, analyze_moe_type, parse_layers, spectrum_passes
from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint, open_moe_checkpoint
from lazarus_core.models.resolve import CONFIG_NAME, INDEX_NAME, SINGLE_NAME
from lazarus_core.models.safetensors_file import SafetensorsFile

# What makes one model's row an error row instead of stopping the sweep: the user errors the CLI reports in one
# line (missing model, unsupported family, bad layer, broken checkpoint, failed download, missing backend).
MODEL_ERRORS = (ValueError, OSError, IndexError, BackendUnavailableError)


@dataclass
class ReadSummary:
    """What a model's analysis read.

    Attributes
    ----------
    layers : list of int
        The MoE layers analysed.
    weight_files_read, weight_files_total : int
        Weight files (safetensors shards) opened, and in the checkpoint.
    weight_file_bytes : int
        Sizes of the opened weight files (what a hub model downloads).
    expert_bytes : int
        The analysed layers' routed-expert tensors as stored (from the safetensors headers).
    files : dict
        Every file opened (config, index, shards) -> size in bytes.
    """

    layers: list[int]
    weight_files_read: int
    weight_files_total: int
    weight_file_bytes: int
    expert_bytes: int
    files: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepRow:
    """One model's line of the taxonomy table; every field but ``model`` and ``error`` is None for a failed model.

    Attributes
    ----------
    rank_95 : dict
        Projection -> mean over the analysed layers of ``effective_rank_95`` (mean over experts).
    rank_95_fraction : dict
        The same over the projection's ``max_rank`` (the "% of max").
    cosine : float
        Mean over layers of the layer's mean off-diagonal expert cosine.
    compressible, compression_ratio
        ``MoeTypeReport.compression["compressible"]`` and ``["ratio"]`` (the compressor's balanced preset).
    """

    model: str
    error: str | None = None
    family: str | None = None
    num_experts: int | None = None
    top_k: int | None = None
    moe_type: str | None = None
    confidence: float | None = None
    rank_95: dict[str, float] | None = None
    rank_95_fraction: dict[str, float] | None = None
    max_rank: dict[str, int] | None = None
    cosine: float | None = None
    compressible: bool | None = None
    compression_ratio: float | None = None
    compression: dict | None = None
    read: ReadSummary | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["read"] = None if self.read is None else self.read.to_dict()
        return d


@dataclass
class MoeTypeSweep:
    """Result of :func:`sweep_moe_type`; ``to_dict()`` is the sweep's JSON (rows, then every full report)."""

    rows: list[SweepRow]
    reports: list[MoeTypeReport | None]
    layers: str
    seconds: float

    def to_dict(self) -> dict:
        return {"layers": self.layers, "seconds": self.seconds, "rows": [r.to_dict() for r in self.rows],
                "models": [None if r is None else r.to_dict() for r in self.reports]}


@dataclass
class EstimateRow:
    """One model's estimate, or why it could not be made."""

    model: str
    estimate: ModelEstimate | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "error": self.error,
                "estimate": None if self.estimate is None else self.estimate.to_dict()}


@dataclass
class SweepEstimate:
    """Result of :func:`estimate_sweep`: per model, then the totals over the models that could be estimated."""

    rows: list[EstimateRow]
    layers: str
    nproc: int
    seconds: float = 0.0
    bytes_needed: int | None = None
    bytes_to_download: int | None = None
    peak_memory_bytes: int = 0

    def to_dict(self) -> dict:
        return {"layers": self.layers, "nproc": self.nproc, "seconds": self.seconds, "bytes_needed": self.bytes_needed,
                "bytes_to_download": self.bytes_to_download, "peak_memory_bytes": self.peak_memory_bytes,
                "rows": [r.to_dict() for r in self.rows]}


def summary_row(report: MoeTypeReport, read: ReadSummary | None = None, seconds: float | None = None) -> SweepRow:
    """The taxonomy-table row of one model's report (what the sweep prints for it).

    Parameters
    ----------
    report : MoeTypeReport
        From :func:`~lazarus_core.analysis.expert_structure.analyze_moe_type`.
    read : ReadSummary, optional
    seconds : float, optional
        Wall time of the model's run (default: the report's own).

    Returns
    -------
    SweepRow
    """
    layers = report.layers
    rank = {p: sum(layer.projections[p].effective_rank_95 for layer in layers) / len(layers) for p in PROJECTIONS}
    max_rank = {p: layers[0].projections[p].max_rank for p in PROJECTIONS}
    compression = dict(report.compression)
    return SweepRow(
        model=report.model, family=report.family, num_experts=report.num_experts, top_k=report.top_k,
        moe_type=report.moe_type, confidence=report.confidence, rank_95=rank,
        rank_95_fraction={p: rank[p] / max_rank[p] if max_rank[p] else 0.0 for p in PROJECTIONS}, max_rank=max_rank,
        cosine=sum(layer.cosine_similarity["mean"] for layer in layers) / len(layers),
        compressible=compression.get("compressible"), compression_ratio=compression.get("ratio"),
        compression=compression, read=read, seconds=report.seconds if seconds is None else seconds,
    )


def read_summary(ckpt: MoeCheckpoint, layers: Sequence[int]) -> ReadSummary:
    """What an analysis of ``layers`` read from ``ckpt`` (call it after the analysis).

    The expert bytes come from the safetensors headers of the files holding those layers' expert tensors
    (headers only: the files are already local after the analysis).
    """
    source = ckpt.source
    wmap = source.weight_map()
    if not wmap:  # single model.safetensors: its header is the map
        wmap = {name: SINGLE_NAME for name in SafetensorsFile(source.local_path(SINGLE_NAME)).tensors}
    names = [n for tensors in expert_tensor_names(wmap, ckpt.spec, layers).values() for n in tensors]
    headers: dict[str, SafetensorsFile] = {}
    expert_bytes = 0
    for name in names:
        fname = wmap[name]
        if fname not in headers:
            headers[fname] = SafetensorsFile(source.local_path(fname))
        expert_bytes += headers[fname].info(name).nbytes
    for f in headers.values():
        f.close()
    files = source.files_opened()
    weights = {n: s for n, s in files.items() if n not in (CONFIG_NAME, INDEX_NAME)}
    return ReadSummary(layers=list(layers), weight_files_read=len(weights), weight_files_total=len(set(wmap.values())),
                       weight_file_bytes=sum(weights.values()), expert_bytes=expert_bytes, files=files)


def _check_options(base_method: str, device: str | None) -> None:
    """A bad ``--base`` or ``--device`` fails the whole sweep (ValueError), not each model in turn."""
    from lazarus_core.spectra.parallel import resolve_device

    spectrum_passes(base_method)
    resolve_device(device)


def sweep_moe_type(models: Sequence[str], layers: str | None = None, *, revision: str | None = None,
                   on_model: Callable[[str], None] | None = None, **analyze_options) -> MoeTypeSweep:
    """Run moe-type-analyze on each model in turn; a model that fails gets a row saying why.

    Parameters
    ----------
    models : sequence of str
        Local directories, built-in aliases or Hugging Face ids (only the files the layers need are fetched).
    layers : str, optional
        ``"all"`` (default) or ``"0,3,7"``, applied to every model (a model lacking one of them gets an error row).
    revision : str, optional
        Hub revision for every hub model.
    on_model : callable, optional
        Called with each model name before it starts (progress).
    **analyze_options
        Passed to :func:`~lazarus_core.analysis.expert_structure.analyze_moe_type` (``backend``, ``progress``,
        ``base_method``...).

    Returns
    -------
    MoeTypeSweep
    """
    if not models:
        raise ValueError("no models to sweep: pass -m MODEL (repeatable) or models as arguments")
    _check_options(analyze_options.get("base_method", "refined"), analyze_options.get("device"))
    t0 = time.perf_counter()
    rows: list[SweepRow] = []
    reports: list[MoeTypeReport | None] = []
    for model in models:
        if on_model is not None:
            on_model(model)
        started = time.perf_counter()
        try:
            with open_moe_checkpoint(model, revision=revision) as ckpt:
                layer_list = parse_layers(layers, ckpt.moe_layers)
                report = analyze_moe_type(ckpt, layer_list, model_name=str(model), **analyze_options)
                read = read_summary(ckpt, layer_list)
        except MODEL_ERRORS as exc:
            rows.append(SweepRow(model=str(model), error=str(exc), seconds=time.perf_counter() - started))
            reports.append(None)
            continue
        rows.append(summary_row(report, read, time.perf_counter() - started))
        reports.append(report)
    return MoeTypeSweep(rows=rows, reports=reports, layers=layers or "all", seconds=time.perf_counter() - t0)


def estimate_sweep(models: Sequence[str], layers: str | None = None, *, revision: str | None = None, nproc: int = 1,
                   device: str = "cpu", repeats: int = 1, base_method: str = "refined") -> SweepEstimate:
    """:func:`~lazarus_core.analysis.estimate.estimate_moe_type` for each model, and the totals.

    Returns
    -------
    SweepEstimate
        Totals cover the models that could be estimated (``bytes_*`` None when any size is unknown); peak
        memory is the largest model's (the models run one after another).
    """
    if not models:
        raise ValueError("no models to estimate: pass -m MODEL (repeatable) or models as arguments")
    _check_options(base_method, device)
    rows = []
    for model in models:
        try:
            rows.append(EstimateRow(str(model), estimate_moe_type(model, layers, revision=revision, nproc=nproc,
                                                                     device=device, repeats=repeats,
                                                                     base_method=base_method)))
        except MODEL_ERRORS as exc:
            rows.append(EstimateRow(str(model), error=str(exc)))
    done = [r.estimate for r in rows if r.estimate is not None]
    needed = [e.bytes_needed for e in done]
    download = [e.bytes_to_download for e in done]
    return SweepEstimate(
        rows=rows, layers=layers or "all", nproc=nproc, seconds=sum(e.seconds for e in done),
        bytes_needed=None if None in needed else sum(needed), bytes_to_download=None if None in download
        else sum(download), peak_memory_bytes=max((e.peak_memory_bytes_total for e in done), default=0),
    )
