"""Expert-delta spectra of one OLMoE-shaped layer (64 experts, gate/up [1024, 2048], down [2048, 1024],
bf16 on disk): the streaming pipeline vs the naive path (load all experts, stack, svdvals per delta)
and vs the floor (Gram GEMM flops over the measured matmul rate, plus the measured eigensolver time).

The naive path takes minutes per projection here, so it runs on a sample of experts and its time is
extrapolated to all of them (the table says so); ranks are compared on the sampled experts. Everything
runs with one torch thread: on a shared 2-core machine, 2-thread LAPACK calls slow down by up to 30x
when another process holds a core, which would flatter whichever path ran at the wrong moment.
Run: `python -m benchmarks expert_spectra`.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import BenchRow, median_seconds

EXPERTS, INTER, HIDDEN = 64, 1024, 2048
NAIVE_SAMPLE = 3


def write_layer(directory: Path, experts: int = EXPERTS, inter: int = INTER, hidden: int = HIDDEN) -> Path:
    """One OLMoE MoE layer, per-expert bf16 tensors, native-like random experts."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for e in range(experts):
        tensors = {f"model.layers.0.mlp.experts.{e}.{name}.weight": (torch.randn(shape, generator=gen) * 0.02).bfloat16()
                   for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                       ("down_proj", (hidden, inter)))}
        save_file(tensors, str(directory / f"model-{e:05d}.safetensors"))
    weight_map = {f"model.layers.0.mlp.experts.{e}.{n}.weight": f"model-{e:05d}.safetensors"
                  for e in range(experts) for n in ("gate_proj", "up_proj", "down_proj")}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "olmoe", "num_hidden_layers": 1, "hidden_size": hidden, "intermediate_size": inter,
        "num_experts": experts, "num_experts_per_tok": 8}))
    return directory


def _builtin_rows() -> list[BenchRow]:
    """Whole-model moe-type-analyze time on each installed built-in model."""
    from lazarus_core.analysis.expert_structure import analyze_moe_type
    from lazarus_core.models import open_moe_checkpoint
    from lazarus_core.models.builtin import list_builtin_models

    rows = []
    for model in list_builtin_models():
        ckpt = open_moe_checkpoint(model.alias)
        t0 = time.perf_counter()
        report = analyze_moe_type(ckpt)
        seconds = time.perf_counter() - t0
        rows.append(BenchRow("moe-type-analyze", "whole model", f"{model.alias} ({len(report.layers)} layers x "
                             f"{ckpt.num_experts} experts x 3)", ckpt.storage_format(ckpt.moe_layers[0]),
                             seconds * 1e3, extra={"moe_type": report.moe_type}))
    return rows


def run(repeats: int = 1) -> tuple[list[BenchRow], dict]:
    from lazarus_core.analysis.expert_structure import analyze_projection
    from lazarus_core.spectra import energy_rank, singular_values_reference
    from lazarus_core.models import open_moe_checkpoint

    rows: list[BenchRow] = []
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = open_moe_checkpoint(write_layer(Path(tmp) / "olmoe_layer"))
        a = torch.randn(INTER, HIDDEN, dtype=torch.float64)
        gemm_t = median_seconds(lambda: a @ a.T, repeats=3, warmup=1)
        gram_flops = 2.0 * INTER * INTER * HIDDEN
        fp64_rate = gram_flops / gemm_t
        g = a @ a.T
        eig_t = median_seconds(lambda: torch.linalg.eigvalsh(g), repeats=3, warmup=1)
        floor_per_expert = gram_flops / fp64_rate + eig_t
        total_pipeline = total_naive = total_floor = 0.0
        for proj in ("gate", "up", "down"):
            t0 = time.perf_counter()
            result = analyze_projection(ckpt, 0, proj)
            t_pipe = time.perf_counter() - t0
            # naive: stack every expert (fp32), mean, float32 svdvals of each delta (timed on a sample)
            t0 = time.perf_counter()
            stacked = torch.stack([ckpt.expert_weight(0, proj, e) for e in range(EXPERTS)])
            base = stacked.mean(0)
            t_load = time.perf_counter() - t0
            t0 = time.perf_counter()
            naive_ranks = [energy_rank(torch.linalg.svdvals(stacked[e] - base), 0.95) for e in range(NAIVE_SAMPLE)]
            t_svd = (time.perf_counter() - t0) / NAIVE_SAMPLE
            del stacked
            t_naive = t_load + t_svd * EXPERTS
            ref_ranks = [energy_rank(singular_values_reference(ckpt.expert_weight(0, proj, e) - base), 0.95)
                         for e in range(NAIVE_SAMPLE)]
            identical = result.experts_rank_95[:NAIVE_SAMPLE] == ref_ranks == naive_ranks
            floor = floor_per_expert * EXPERTS
            total_pipeline, total_naive, total_floor = total_pipeline + t_pipe, total_naive + t_naive, total_floor + floor
            shape = f"{EXPERTS} x {list(ckpt.projection_shape(proj))}"
            rows.append(BenchRow("expert_spectra", "pipeline", f"{proj} {shape}", "bf16->fp32/fp64", t_pipe * 1e3,
                                 pct_of_floor=100 * floor / t_pipe, ratio_to_reference=t_naive / t_pipe,
                                 extra={"ranks_identical_to_fp64_svd_on_sample": identical,
                                        "effective_rank_95": result.effective_rank_95}))
            rows.append(BenchRow("expert_spectra", f"naive svdvals (extrapolated from {NAIVE_SAMPLE})",
                                 f"{proj} {shape}", "fp32", t_naive * 1e3, ratio_to_reference=1.0))
        rows.append(BenchRow("expert_spectra", "pipeline, whole layer", f"3 x {EXPERTS} experts", "bf16->fp32/fp64",
                             total_pipeline * 1e3, pct_of_floor=100 * total_floor / total_pipeline,
                             ratio_to_reference=total_naive / total_pipeline))
    rows.extend(_builtin_rows())
    floors = {"fp64_gram_gflops": fp64_rate / 1e9, "eigvalsh_1024_fp64_ms": eig_t * 1e3,
              "floor_layer_s": total_floor}
    return rows, floors
