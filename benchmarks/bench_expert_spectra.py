"""Expert-delta spectra of one OLMoE-shaped layer (64 experts, gate/up [1024, 2048], down [2048, 1024],
bf16 on disk): the streaming pipeline vs the naive path (load all experts, stack, svdvals per delta)
and vs the floor (the fastest measured float64 Gram and eigensolve on one thread, over the cores).

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
        floor_per_expert, floors = _expert_floor(INTER, HIDDEN)
        total_pipeline = total_naive = total_floor = 0.0
        for proj in ("gate", "up", "down"):
            t0 = time.perf_counter()
            result = analyze_projection(ckpt, 0, proj, base_method="mean")  # the naive path's base: like for like
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
            rows.append(BenchRow("expert_spectra", "pipeline (--base mean)", f"{proj} {shape}", "bf16->fp32/fp64",
                                 t_pipe * 1e3,
                                 pct_of_floor=100 * floor / t_pipe, ratio_to_reference=t_naive / t_pipe,
                                 extra={"ranks_identical_to_fp64_svd_on_sample": identical,
                                        "effective_rank_95": result.effective_rank_95}))
            rows.append(BenchRow("expert_spectra", f"naive svdvals (extrapolated from {NAIVE_SAMPLE})",
                                 f"{proj} {shape}", "fp32", t_naive * 1e3, ratio_to_reference=1.0))
        rows.append(BenchRow("expert_spectra", "pipeline (--base mean), whole layer", f"3 x {EXPERTS} experts",
                             "bf16->fp32/fp64",
                             total_pipeline * 1e3, pct_of_floor=100 * total_floor / total_pipeline,
                             ratio_to_reference=total_naive / total_pipeline))
    rows.extend(_builtin_rows())
    floors["floor_layer_s"] = total_floor
    return rows, floors


def _expert_floor(rows: int, cols: int) -> tuple[float, dict]:
    """Seconds per expert no engine run can beat on this machine: the fastest measured float64 Gram of a
    ``[rows, cols]`` delta (torch's full GEMM counted at half its time, since only the symmetric half is
    needed, or OpenBLAS ``dsyrk``) plus the fastest measured eigensolve of the ``rows x rows`` Gram (torch's
    or numpy's), on one thread, divided by the cores (as if the workers scaled perfectly)."""
    import numpy as np

    from lazarus_core.spectra import openblas
    from lazarus_core.spectra.linalg import _gram_lower
    from lazarus_core.spectra.parallel import cpu_cores

    a = torch.randn(rows, cols, dtype=torch.float64)
    g = a @ a.T
    gram_t = {"torch_gemm_half": median_seconds(lambda: a @ a.T, repeats=3, warmup=1) / 2}
    eig_t = {"torch": median_seconds(lambda: torch.linalg.eigvalsh(g), repeats=3, warmup=1)}
    if openblas.usable():
        gram_t["openblas_dsyrk"] = median_seconds(lambda: _gram_lower(a), repeats=3, warmup=1)

        def numpy_eig() -> None:
            with openblas.torch_threads():
                np.linalg.eigvalsh(g.numpy())

        eig_t["numpy"] = median_seconds(numpy_eig, repeats=3, warmup=1)
    cores = cpu_cores()
    per_expert = (min(gram_t.values()) + min(eig_t.values())) / cores
    return per_expert, {"gram_1_thread_ms": {k: v * 1e3 for k, v in gram_t.items()},
                        "eigvalsh_1_thread_ms": {k: v * 1e3 for k, v in eig_t.items()}, "cores": cores,
                        "floor_per_expert_ms": per_expert * 1e3}


# --layer64: moe-type-analyze of the whole 64-expert layer against the naive path, in one run (issue 18 s1).

def _naive_ranks(ckpt, proj: str, experts: list[int]) -> tuple[list[int], float, float]:
    """The naive path at torch's default threads: load and stack every expert, the mean, then
    ``torch.linalg.svdvals`` of each delta in ``experts``: ``(95% ranks, load + stack s, mean svdvals s)``."""
    from lazarus_core.spectra import energy_rank

    t0 = time.perf_counter()
    stacked = torch.stack([ckpt.expert_weight(0, proj, e) for e in range(ckpt.num_experts)])
    base = stacked.mean(0)
    t_load = time.perf_counter() - t0
    ranks, times = [], []
    for e in experts:
        t0 = time.perf_counter()
        ranks.append(energy_rank(torch.linalg.svdvals(stacked[e] - base), 0.95))
        times.append(time.perf_counter() - t0)
    return ranks, t_load, sum(times) / len(times)


def _stages(ckpt, proj: str) -> dict[str, float]:
    """Seconds of each stage of one projection's analysis at default workers (mean pass, refined base, one
    spectrum pass, the cosine Gram) and of one expert's float64 Gram / eigvalsh on one thread."""
    from lazarus_core.analysis.expert_structure import _cosine_gram
    from lazarus_core.spectra import gram, mean_and_noise, one_thread, openblas, overlay_base, projection_spectrum

    out = {}
    t0 = time.perf_counter()
    mean, _ = mean_and_noise(ckpt, 0, proj)
    out["mean_pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    projection_spectrum(ckpt, 0, proj, base_method="mean", mean=mean)
    out["spectrum_pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    overlay_base(ckpt, 0, proj, method="refined", mean=mean, iterations=1)
    out["refine_iteration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _cosine_gram(ckpt, 0, proj)
    out["cosine_gram"] = time.perf_counter() - t0
    delta = ckpt.expert_weight(0, proj, 0) - mean
    with one_thread():
        t0 = time.perf_counter()
        g = gram(delta)
        out["gram_1_expert_1_thread"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        openblas.eigvalsh(g)
        out["eigvalsh_1_expert_1_thread"] = time.perf_counter() - t0
    out["numpy_openblas"] = openblas.usable()
    return out


def run_layer64(repeats: int = 3, naive_sample: int = 2, base_method: str = "mean", serial: bool = True,
                directory: Path | None = None) -> dict:
    """moe-type-analyze of one 64-expert OLMoE layer ([1024, 2048] gate/up, [2048, 1024] down, bf16) with the
    engine's default (every core, single-threaded workers) and, if ``serial``, with one worker, interleaved
    with the naive path (timed on ``naive_sample`` experts per projection, extrapolated to 64; the stacking
    is timed in full), ``repeats`` times. Prints one JSON line per measurement (load average included) and
    returns the medians, the ratio and whether the sampled experts' 95% ranks equal the naive ones."""
    import os
    import statistics

    from lazarus_core.models import open_moe_checkpoint

    def log(**entry) -> None:
        entry["loadavg_1min"] = os.getloadavg()[0]
        print(json.dumps(entry), flush=True)

    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = open_moe_checkpoint(write_layer(directory or Path(tmp) / "olmoe_layer"))
        sample = list(range(naive_sample))
        times: dict[str, list[float]] = {"naive": [], "engine": [], "engine_1_worker": []}
        ranks_equal, naive_ranks = True, {}
        for r in range(repeats):
            naive = 0.0
            for proj in ("gate", "up", "down"):
                ranks, t_load, t_svd = _naive_ranks(ckpt, proj, sample)
                naive += t_load + t_svd * ckpt.num_experts
                log(repeat=r, path="naive", projection=proj, load_stack_s=t_load, svdvals_per_expert_s=t_svd,
                    threads=torch.get_num_threads(), ranks_95=ranks)
                naive_ranks.setdefault(proj, ranks)
            times["naive"].append(naive)
            log(repeat=r, path="naive", layer_s_extrapolated=naive)
            for name, workers in (("engine", None), ("engine_1_worker", 1)):
                if workers == 1 and not serial:
                    continue
                t0 = time.perf_counter()
                report = _analyze(ckpt, base_method, workers)
                seconds = time.perf_counter() - t0
                assert torch.get_num_threads() == default_threads
                times[name].append(seconds)
                got = {p: s.experts_rank_95[:naive_sample] for p, s in report.layers[0].projections.items()}
                equal = got == naive_ranks
                ranks_equal &= equal
                log(repeat=r, path=name, layer_s=seconds, ranks_95_sample=got, ranks_equal_naive=equal)
        stages = {p: _stages(ckpt, p) for p in ("gate", "down")}
        log(path="stages", stages=stages)
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    result = {"medians_s": medians, "ratio_naive_over_engine": medians["naive"] / medians["engine"],
              "ranks_equal": ranks_equal, "base": base_method, "repeats": repeats, "naive_sample": naive_sample,
              "stages_s": stages, "cores": os.cpu_count(), "loadavg": os.getloadavg()}
    if "engine_1_worker" in medians:
        result["ratio_1_worker_over_engine"] = medians["engine_1_worker"] / medians["engine"]
    print(json.dumps(result), flush=True)
    return result


def _analyze(ckpt, base_method: str, workers: int | None):
    """analyze_moe_type of layer 0 with ``workers`` CPU workers (None: the default, every core)."""
    from lazarus_core.analysis.expert_structure import analyze_moe_type

    return analyze_moe_type(ckpt, [0], base_method=base_method, workers=workers)


def run_workers_ab(experts: int = 16, repeats: int = 3, projection: str = "gate") -> dict:
    """The CPU worker threads against one worker (the serial path: 2-thread Gram, 1-thread eigensolve), on one
    projection of an OLMoE-shaped layer of ``experts`` experts (mean base), interleaved ``repeats`` times; one
    JSON line per run (with the load average), then the medians and their ratio."""
    import os
    import statistics

    from lazarus_core.models import open_moe_checkpoint
    from lazarus_core.spectra import projection_spectrum
    from lazarus_core.spectra.parallel import cpu_cores

    times: dict[int, list[float]] = {1: [], cpu_cores(): []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = open_moe_checkpoint(write_layer(Path(tmp) / "layer", experts=experts))
        reference = None
        for r in range(repeats):
            for workers in times:
                t0 = time.perf_counter()
                sp = projection_spectrum(ckpt, 0, projection, base_method="mean", workers=workers)
                times[workers].append(time.perf_counter() - t0)
                ranks = [sp.energy_rank(f) for f in (0.9, 0.95, 0.99)]
                reference = reference or ranks
                print(json.dumps({"repeat": r, "workers": workers, "s": times[workers][-1], "ranks": ranks,
                                  "ranks_equal": ranks == reference, "loadavg_1min": os.getloadavg()[0]}), flush=True)
    medians = {w: statistics.median(v) for w, v in times.items()}
    result = {"experts": experts, "projection": projection, "medians_s": medians,
              "ratio_1_worker_over_all": medians[1] / medians[max(medians)]}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer64", action="store_true", help="whole 64-expert layer: engine vs naive (issue 18)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-sample", type=int, default=2, help="experts per projection the naive svdvals times")
    parser.add_argument("--base", default="mean", choices=("mean", "refined"), help="moe-type-analyze --base")
    parser.add_argument("--no-serial", action="store_true", help="skip the 1-worker engine run")
    parser.add_argument("--workers-ab", type=int, default=0, metavar="EXPERTS",
                        help="one projection of EXPERTS experts: every core's workers vs one worker")
    args = parser.parse_args()
    if args.workers_ab:
        run_workers_ab(args.workers_ab, args.repeats)
    elif args.layer64:
        run_layer64(args.repeats, args.naive_sample, args.base, not args.no_serial)
    else:
        for row in run()[0]:
            print(row)
