"""Native MoE or pseudo-MoE? Streams every expert of every MoE layer and measures the spectrum of each
expert's difference from the mean expert, the cosine geometry of the experts, (for MXFP4/FP8 sources)
how much of the delta rises above the quantisation noise floor, and the rank the overlay compressor
would choose.

Per layer and projection, every pass holds about one expert (the spectra engine, lazarus_core.spectra):
1. the mean expert and the rounding-noise energies, then per expert ``delta_e = W_e - mean`` and its
   singular spectrum (the classification signal);
2. the compressor's spectrum: deltas from the overlay base (refined from that mean, as moe-overlay-compute
   does), read with the compressor's energy definition (``ProjectionSpectrum.kept_energy``);
3. the E x E Gram of the experts for cosine similarity, accumulated over row chunks of all experts
   (memory O(E x chunk), chunk chosen so the chunk of all experts is about two experts' worth).
Biases are reported separately and never folded into the weights (DESIGN.md section 7).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from lazarus_core.distributed import World, current_world
from lazarus_core.models.checkpoint import PROJECTIONS, MoeCheckpoint
from lazarus_core.overlay.ranks import PRESETS, choose_ranks, make_policy
from lazarus_core.overlay.sizes import expert_bytes
from lazarus_core.spectra import BASE_METHODS, ProjectionSpectrum, cumulative_energy, energy_rank, projection_spectrum

ENERGY_FRACTIONS = (0.90, 0.95, 0.99)
# The compressor's default (moe-overlay-compute / -compress without rank options) and its factor dtype.
COMPRESSOR_PRESET = "balanced"
COMPRESSOR_DTYPE = "bf16"

# Classification thresholds (documented in docs/moe_type.md). rank_ratio is the mean over experts and
# projections of the 95%-energy rank of W_e - mean(W) divided by min(out, in); cosine is the mean
# off-diagonal cosine similarity of the expert weights.
PSEUDO_MAX_RANK_RATIO = 0.25
NATIVE_MIN_RANK_RATIO = 0.30
PSEUDO_MIN_COSINE = 0.30
NATIVE_MAX_COSINE = 0.30
MOE_TYPES = ("pseudo-moe", "native-moe", "unknown")


@dataclass
class NoiseFloor:
    """Quantisation noise of the stored experts against their deltas (MXFP4/FP8 sources only).

    Attributes
    ----------
    noise_energy_fraction : float
        Mean over experts of (expected rounding-noise energy) / (delta energy).
    rank_above_noise : list of int
        Per expert: singular values of the delta above the largest singular value white noise of that
        energy would have, ``sigma_noise * (sqrt(out) + sqrt(in))`` (Marchenko-Pastur edge).
    energy_above_noise : list of float
        Per expert: fraction of delta energy in those components.
    """

    noise_energy_fraction: float
    rank_above_noise: list[int]
    energy_above_noise: list[float]
    mean_rank_above_noise: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProjectionStructure:
    """Delta spectra and expert geometry of one projection of one MoE layer.

    ``experts_rank_*`` / ``effective_rank_*`` / ``rank_ratio`` read the spectra of ``W_e - mean`` (all
    components): the classification signal. ``compressor_rank`` is the rank moe-overlay-compute chooses at
    its default preset (energy 0.95, same base and energy definition), ``compressor_kept_energy`` the energy
    each expert keeps there (``ProjectionSpectrum.kept_energy``).
    """

    projection: str
    shape: list[int]
    max_rank: int
    storage: str
    experts_rank_90: list[int]
    experts_rank_95: list[int]
    experts_rank_99: list[int]
    effective_rank_90: float
    effective_rank_95: float
    effective_rank_99: float
    rank_ratio: float
    delta_energy_fraction: float
    experts_delta_energy_fraction: list[float]
    expert_norms: list[float]
    norm_spread: float
    cosine_similarity: dict
    cosine_matrix: list[list[float]]
    energy_curve: list[float]
    compressor_rank: int = 0
    compressor_kept_energy: list[float] = field(default_factory=list)
    bias: dict | None = None
    noise_floor: NoiseFloor | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["noise_floor"] = None if self.noise_floor is None else self.noise_floor.to_dict()
        return d


@dataclass
class LayerStructure:
    layer: int
    moe_type: str
    confidence: float
    rank_ratio: float
    cosine_similarity: dict
    projections: dict[str, ProjectionStructure] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "projections"}
        d["projections"] = {p: s.to_dict() for p, s in self.projections.items()}
        return d


@dataclass
class MoeTypeReport:
    """Result of :func:`analyze_moe_type`; ``to_dict()`` is the documented JSON.

    ``compression``: ``{"preset", "energy", "base", "ratio", "compressible"}``: the expert bytes as stored
    over the overlay's bytes (bf16 factors and base) at every analysed projection's ``compressor_rank``;
    ``compressible`` is ``ratio > 1``.
    """

    model: str
    family: str
    num_experts: int
    top_k: int
    moe_type: str
    confidence: float
    agreement: float
    layers: list[LayerStructure]
    thresholds: dict
    seconds: float = 0.0
    compression: dict = field(default_factory=dict)
    distributed: dict | None = None

    def to_dict(self) -> dict:
        d = {
            "model": self.model, "family": self.family, "num_experts": self.num_experts, "top_k": self.top_k,
            "moe_type": self.moe_type, "confidence": self.confidence, "agreement": self.agreement,
            "thresholds": self.thresholds, "seconds": self.seconds, "compression": self.compression,
            "layers": [layer.to_dict() for layer in self.layers],
        }
        if self.distributed is not None:  # torchrun job: world size and which rank computed which layers
            d["distributed"] = self.distributed
        return d


def thresholds() -> dict:
    """The classification thresholds, as written into every report."""
    return {"pseudo_max_rank_ratio": PSEUDO_MAX_RANK_RATIO, "native_min_rank_ratio": NATIVE_MIN_RANK_RATIO,
            "pseudo_min_cosine": PSEUDO_MIN_COSINE, "native_max_cosine": NATIVE_MAX_COSINE,
            "rank_ratio": "mean over experts and projections of rank_95(W_e - mean W) / min(out, in)",
            "cosine": "mean off-diagonal cosine similarity of the expert weight matrices"}


def classify(rank_ratio: float, cosine: float) -> tuple[str, float]:
    """Layer type and confidence in [0, 1] from the two signals.

    pseudo-moe: low-rank deltas around a shared base (rank_ratio <= 0.25 and cosine >= 0.30);
    native-moe: independent experts (rank_ratio >= 0.30 and cosine <= 0.30); otherwise unknown.
    Confidence is 0.5 + 0.5 x the mean of the two margins to the thresholds (each normalised to [0, 1]).
    """
    if rank_ratio <= PSEUDO_MAX_RANK_RATIO and cosine >= PSEUDO_MIN_COSINE:
        margins = ((PSEUDO_MAX_RANK_RATIO - rank_ratio) / PSEUDO_MAX_RANK_RATIO,
                   (cosine - PSEUDO_MIN_COSINE) / (1.0 - PSEUDO_MIN_COSINE))
        return "pseudo-moe", min(1.0, 0.5 + 0.25 * sum(margins))
    if rank_ratio >= NATIVE_MIN_RANK_RATIO and cosine <= NATIVE_MAX_COSINE:
        margins = ((rank_ratio - NATIVE_MIN_RANK_RATIO) / (1.0 - NATIVE_MIN_RANK_RATIO),
                   min(1.0, (NATIVE_MAX_COSINE - cosine) / NATIVE_MAX_COSINE))
        return "native-moe", min(1.0, 0.5 + 0.25 * sum(margins))
    return "unknown", 0.0


def cosine_chunks(ckpt: MoeCheckpoint, layer: int, projection: str, memory_experts: float = 2.0
                  ) -> list[tuple[int, int]]:
    """The ``(first row, stop row)`` chunks the E x E cosine Gram of a projection is summed over: all experts'
    rows of one chunk together hold about ``memory_experts`` experts (FP8: whole scale blocks)."""
    n_experts = ckpt.num_experts
    out_dim, _ = ckpt.projection_shape(projection)
    chunk = max(1, int(memory_experts * out_dim / n_experts))
    if ckpt.storage_format(layer) == "fp8_e4m3":
        block = (ckpt.spec.fp8_block_size or (128, 128))[0]
        chunk = max(block, chunk // block * block)
    return [(start, min(out_dim, start + chunk)) for start in range(0, out_dim, chunk)]


def cosine_gram_parts(ckpt: MoeCheckpoint, layer: int, projection: str, chunks: list[tuple[int, int]]
                      ) -> Iterator[torch.Tensor]:
    """Yield the float64 ``[E, E]`` Gram of the flattened rows of every expert, one per chunk of ``chunks``
    (from :func:`cosine_chunks`); their sum in chunk order is the projection's cosine Gram (a rank of a
    distributed job computes a contiguous share of the chunks)."""
    n_experts = ckpt.num_experts
    _, in_dim = ckpt.projection_shape(projection)
    widest = max((stop - start for start, stop in chunks), default=0)
    rows = torch.empty(n_experts, widest * in_dim, dtype=torch.float32)
    for start, stop in chunks:
        x = rows[:, : (stop - start) * in_dim]
        for e in range(n_experts):
            x[e] = ckpt.expert_rows(layer, projection, e, start, stop).reshape(-1)
        yield (x @ x.T).double()


def sum_in_order(parts: Iterable[torch.Tensor], n: int) -> torch.Tensor:
    """float64 ``[n, n]`` sum of ``parts`` added one after the other from zero (the order fixes the rounding)."""
    total = torch.zeros(n, n, dtype=torch.float64)
    for part in parts:
        total += part
    return total


def _cosine_gram(ckpt: MoeCheckpoint, layer: int, projection: str) -> torch.Tensor:
    """float64 ``[E, E]`` Gram of the flattened expert weights, over row chunks of all experts at once."""
    parts = cosine_gram_parts(ckpt, layer, projection, cosine_chunks(ckpt, layer, projection))
    return sum_in_order(parts, ckpt.num_experts)


def _cosine_summary(gram: torch.Tensor) -> tuple[torch.Tensor, dict]:
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    cos = gram / norms[:, None] / norms[None, :]
    n = cos.shape[0]
    off = cos[~torch.eye(n, dtype=torch.bool)] if n > 1 else torch.zeros(1, dtype=torch.float64)
    return cos, {"mean": float(off.mean()), "std": float(off.std()) if off.numel() > 1 else 0.0,
                 "min": float(off.min()), "max": float(off.max())}


def _bias_stats(ckpt: MoeCheckpoint, layer: int, projection: str) -> dict | None:
    bias = ckpt.expert_bias(layer, projection)
    if bias is None:
        return None
    norms = bias.norm(dim=1)
    mean_bias = bias.mean(0, keepdim=True)
    return {"shape": list(bias.shape), "norm_mean": float(norms.mean()), "norm_std": float(norms.std()),
            "abs_mean": float(bias.abs().mean()),
            "delta_norm_mean": float((bias - mean_bias).norm(dim=1).mean()),
            "note": "reported separately; never folded into the weight spectra"}


def analyze_projection(ckpt: MoeCheckpoint, layer: int, projection: str, *, backend: str = "auto",
                       on_expert: Callable[[], None] | None = None, base_method: str = "refined",
                       device: str | None = None, workers: int | None = None) -> ProjectionStructure:
    """Delta spectra, energies, cosine geometry, noise floor and compressor rank of one projection.

    Parameters
    ----------
    ckpt, layer, projection, backend
        As :func:`lazarus_core.spectra.projection_spectrum`.
    on_expert : callable, optional
        Called after each expert of each spectrum pass (progress reporting; see :func:`spectrum_passes`).
    base_method : {"refined", "mean"}
        The compressor's base for ``compressor_rank`` (moe-overlay-compute ``--base``; default refined).
    device, workers
        Where the Grams and eigensolves run (:mod:`lazarus_core.spectra.parallel`): "cpu" with ``workers``
        single-threaded worker threads (default every core), or batched on a device such as "cuda".

    Returns
    -------
    ProjectionStructure
    """
    spectrum = projection_spectrum(ckpt, layer, projection, backend=backend, base_method="mean", on_expert=on_expert,
                                   keep_base=base_method != "mean", device=device, workers=workers)
    compressor = spectrum
    if base_method != "mean":
        compressor = projection_spectrum(ckpt, layer, projection, backend=backend, base_method=base_method,
                                         on_expert=on_expert, mean=spectrum.base, noise_energy=spectrum.noise_energy,
                                         device=device, workers=workers)
    spectrum.base = None
    return _structure(ckpt, layer, spectrum, compressor)


def spectrum_passes(base_method: str) -> int:
    """How many times :func:`analyze_projection` calls ``on_expert`` per expert (1 for a mean base, else 2)."""
    if base_method not in BASE_METHODS:
        raise ValueError(f"--base must be one of {list(BASE_METHODS)}, got {base_method!r}")
    return 1 if base_method == "mean" else 2


def compressor_rank(ckpt: MoeCheckpoint, spectrum: ProjectionSpectrum) -> int:
    """The rank moe-overlay-compute chooses for this spectrum at its default preset (the same choose_ranks)."""
    key = (spectrum.layer, spectrum.projection)
    return choose_ranks(make_policy(preset=COMPRESSOR_PRESET), {key: spectrum}, dtype=COMPRESSOR_DTYPE,
                        has_bias=ckpt.spec.expert_bias)[key]


def _structure(ckpt: MoeCheckpoint, layer: int, spectrum: ProjectionSpectrum, compressor: ProjectionSpectrum,
               cosine_gram: torch.Tensor | None = None) -> ProjectionStructure:
    """Everything the report says about one projection, read off its mean-base and compressor spectra (and its
    E x E cosine Gram, computed here unless given)."""
    n_experts = spectrum.num_experts
    out_dim, in_dim = spectrum.shape
    max_rank = spectrum.max_rank
    ranks = {f: [energy_rank(row, f) for row in spectrum.singular] for f in ENERGY_FRACTIONS}
    delta_energy = spectrum.delta_energy()
    expert_energy = spectrum.expert_energy
    delta_fraction = torch.where(expert_energy > 0, delta_energy / expert_energy.clamp_min(1e-300), 0.0).tolist()
    norms_t = expert_energy.sqrt()
    noise_floor = None
    if spectrum.noise_energy is not None:
        counted = spectrum.counted_components()
        above = torch.stack([row[:int(c)].square().sum() for row, c in zip(spectrum.singular, counted)])
        noise_fraction = torch.where(delta_energy > 0, spectrum.noise_energy / delta_energy.clamp_min(1e-300),
                                     math.inf)
        energy_above = torch.where(delta_energy > 0, above / delta_energy.clamp_min(1e-300), 0.0)
        noise_floor = NoiseFloor(float(noise_fraction.mean()), counted.tolist(), energy_above.tolist(),
                                 float(counted.double().mean()))
    mean_rank = {f: sum(r) / n_experts for f, r in ranks.items()}
    chosen = compressor_rank(ckpt, compressor)
    if cosine_gram is None:
        cosine_gram = _cosine_gram(ckpt, layer, spectrum.projection)
    cos, cos_summary = _cosine_summary(cosine_gram)
    return ProjectionStructure(
        projection=spectrum.projection, shape=[out_dim, in_dim], max_rank=max_rank, storage=ckpt.storage_format(layer),
        experts_rank_90=ranks[0.90], experts_rank_95=ranks[0.95], experts_rank_99=ranks[0.99],
        effective_rank_90=mean_rank[0.90], effective_rank_95=mean_rank[0.95], effective_rank_99=mean_rank[0.99],
        rank_ratio=mean_rank[0.95] / max_rank if max_rank else 0.0,
        delta_energy_fraction=sum(delta_fraction) / n_experts, experts_delta_energy_fraction=delta_fraction,
        expert_norms=norms_t.tolist(),
        norm_spread=float(norms_t.std() / norms_t.mean()) if n_experts > 1 and norms_t.mean() > 0 else 0.0,
        cosine_similarity=cos_summary, cosine_matrix=cos.tolist(),
        energy_curve=torch.stack([cumulative_energy(row) for row in spectrum.singular]).mean(0).tolist(),
        compressor_rank=chosen, compressor_kept_energy=compressor.kept_energy(chosen).tolist(),
        bias=_bias_stats(ckpt, layer, spectrum.projection), noise_floor=noise_floor,
    )


def compression_summary(ckpt: MoeCheckpoint, layers: Sequence[LayerStructure], base_method: str = "refined") -> dict:
    """The report's ``compression`` dict: bytes of the overlay at every projection's ``compressor_rank``."""
    ranks = {(layer.layer, p): s.compressor_rank for layer in layers for p, s in layer.projections.items()}
    original, overlay = expert_bytes(ckpt, ranks, COMPRESSOR_DTYPE, [layer.layer for layer in layers]) if ranks \
        else (0, 0)  # the analysed layers' headers only: a hub model fetches no other shard
    return compression_from_bytes(original, overlay, base_method)


def compression_from_bytes(original: int, overlay: int, base_method: str = "refined") -> dict:
    """The ``compression`` dict from the experts' bytes as stored and the overlay's (summed over layers)."""
    ratio = original / overlay if overlay else 0.0
    return {"preset": COMPRESSOR_PRESET, "energy": PRESETS[COMPRESSOR_PRESET], "base": base_method,
            "dtype": COMPRESSOR_DTYPE, "ratio": ratio, "compressible": ratio > 1.0,
            "original_bytes": original, "overlay_bytes": overlay}


def analyze_layer(ckpt: MoeCheckpoint, layer: int, *, backend: str = "auto",
                  on_expert: Callable[[], None] | None = None, base_method: str = "refined", device: str | None = None,
                  workers: int | None = None) -> LayerStructure:
    """All three projections of one MoE layer, with the layer's classification (``device`` / ``workers`` as
    :func:`analyze_projection`)."""
    projections = {p: analyze_projection(ckpt, layer, p, backend=backend, on_expert=on_expert, base_method=base_method,
                                         device=device, workers=workers)
                   for p in PROJECTIONS}
    return layer_structure(layer, projections)


def layer_structure(layer: int, projections: dict[str, ProjectionStructure]) -> LayerStructure:
    """A layer's classification from its projections' structures."""
    rank_ratio = sum(p.rank_ratio for p in projections.values()) / len(projections)
    cos_means = [p.cosine_similarity["mean"] for p in projections.values()]
    cos_stds = [p.cosine_similarity["std"] for p in projections.values()]
    cosine = {"mean": sum(cos_means) / len(cos_means), "std": sum(cos_stds) / len(cos_stds)}
    moe_type, confidence = classify(rank_ratio, cosine["mean"])
    return LayerStructure(layer, moe_type, confidence, rank_ratio, cosine, projections)


def summarize(layers: Sequence[LayerStructure]) -> tuple[str, float, float]:
    """Model type by majority over layers, its confidence, and the fraction of layers that agree."""
    if not layers:
        return "unknown", 0.0, 0.0
    votes = {t: [layer for layer in layers if layer.moe_type == t] for t in MOE_TYPES}
    winner = max(MOE_TYPES, key=lambda t: (len(votes[t]), t != "unknown"))
    agreement = len(votes[winner]) / len(layers)
    confidence = agreement * (sum(layer.confidence for layer in votes[winner]) / len(votes[winner]))
    return winner, confidence, agreement


def parse_layers(spec: str | None, moe_layers: Sequence[int]) -> list[int]:
    """``None``/``"all"`` -> every MoE layer; ``"0,3,7"`` -> those (each must be an MoE layer)."""
    if spec is None or spec == "all":
        return list(moe_layers)
    try:
        wanted = list(dict.fromkeys(int(x) for x in str(spec).split(",") if x.strip()))  # "1,1" is one layer
    except ValueError:
        raise ValueError(f"--layers must be 'all' or comma-separated integers, got {spec!r}") from None
    bad = [x for x in wanted if x not in moe_layers]
    if bad or not wanted:
        raise ValueError(f"layer(s) {bad or spec} are not MoE layers; MoE layers are {list(moe_layers)}")
    return wanted


def analyze_moe_type(ckpt: MoeCheckpoint, layers: Iterable[int] | None = None, *, backend: str = "auto",
                     progress: bool = False, model_name: str | None = None, base_method: str = "refined",
                     world: World | None = None, device: str | None = None, workers: int | None = None,
                     parts_dir: str | None = None) -> MoeTypeReport:
    """Analyse the expert structure of ``layers`` (default: every MoE layer) of a checkpoint.

    Parameters
    ----------
    ckpt : MoeCheckpoint
        From :func:`lazarus_core.models.open_moe_checkpoint`.
    layers : iterable of int, optional
        Model layer indices; default all MoE layers.
    backend : str
        Kernel backend for the fused decode passes.
    progress : bool
        Show a rich progress bar (one step per expert and projection).
    model_name : str, optional
        Name recorded in the report (default: the checkpoint's source).
    base_method : {"refined", "mean"}
        Base of the compressor's spectra (``compressor_rank``, ``compression``), as moe-overlay-compute
        ``--base``; "mean" skips the refinement (one spectrum pass per projection instead of two).
    device, workers
        Where the Grams and eigensolves run (:func:`analyze_projection`; moe-type-analyze ``--device``).
    world : World, optional
        The torch.distributed job (default :func:`lazarus_core.distributed.current_world`): with several ranks
        the layers (or, with fewer layers than ranks, the experts of a layer) are split over them
        (:mod:`lazarus_core.analysis.moe_type_distributed`) and every rank returns the same report, equal to a
        single process's, with ``distributed`` set.
    parts_dir : str, optional
        Distributed jobs only: where finished layers are kept so a rerun after a failed rank resumes.

    Returns
    -------
    MoeTypeReport
    """
    import time

    layer_list = list(ckpt.moe_layers) if layers is None else list(layers)
    world = world if world is not None else current_world()
    if world.distributed:
        from lazarus_core.analysis.moe_type_distributed import analyze_moe_type_distributed

        return analyze_moe_type_distributed(ckpt, layer_list, world=world, backend=backend, progress=progress,
                                            model_name=model_name, base_method=base_method, device=device,
                                            workers=workers, parts_dir=parts_dir)
    t0 = time.perf_counter()
    results: list[LayerStructure] = []
    total = len(layer_list) * len(PROJECTIONS) * ckpt.num_experts * spectrum_passes(base_method)
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True) as bar:
            task = bar.add_task("expert spectra", total=total)
            for layer in layer_list:
                bar.update(task, description=f"layer {layer}")
                results.append(analyze_layer(ckpt, layer, backend=backend, on_expert=lambda: bar.advance(task),
                                             base_method=base_method, device=device, workers=workers))
    else:
        results = [analyze_layer(ckpt, layer, backend=backend, base_method=base_method, device=device, workers=workers)
                   for layer in layer_list]
    return moe_type_report(results, model=model_name or str(ckpt.source), family=ckpt.family,
                           num_experts=ckpt.num_experts, top_k=ckpt.spec.top_k,
                           compression=compression_summary(ckpt, results, base_method), seconds=time.perf_counter() - t0)


def moe_type_report(layers: list[LayerStructure], *, model: str, family: str, num_experts: int, top_k: int,
                    compression: dict, seconds: float, distributed: dict | None = None) -> MoeTypeReport:
    """The report of analysed ``layers``: the model-level call by :func:`summarize` (also what ``lazarus merge``
    and a distributed job use to join layers analysed apart)."""
    moe_type, confidence, agreement = summarize(layers)
    return MoeTypeReport(model=model, family=family, num_experts=num_experts, top_k=top_k, moe_type=moe_type,
                         confidence=confidence, agreement=agreement, layers=layers, thresholds=thresholds(),
                         seconds=seconds, compression=compression, distributed=distributed)
