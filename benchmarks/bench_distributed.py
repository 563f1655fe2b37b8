"""2 torchrun ranks vs 1 process on a 4-layer model: moe-type-analyze and moe-overlay-compress, run as a user
runs them (`lazarus ...` vs `torchrun --standalone --nproc-per-node 2 --no-python lazarus ...`).

Correctness first: the two reports must be equal (timing fields and ``distributed`` aside) and the two
overlays must hold the same tensors. Timed (median_ms): the wall time of the whole command, process
start-up and rendezvous included, what a user waits for; for moe-type-analyze also the analysis time the
report records (``seconds``: from the start of the analysis to the joined result on rank 0; start-up
excluded). Ratios are 1-process time / 2-rank time in the same run. The load average is recorded before
and after: on a shared machine the other processes take cores from both.

    python -m benchmarks distributed [--repeats N]      # at most 3 repeats (each run is tens of seconds)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import BenchRow

LAYERS, EXPERTS, HIDDEN, INTER = 4, 16, 512, 256


def _write_model(directory: Path) -> Path:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256, num_experts=EXPERTS, num_experts_per_tok=2)
    OlmoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(directory)
    return directory


def _command(ranks: int, argv: list[str]) -> tuple[float, str]:
    """Run ``lazarus ARGV`` on ``ranks`` processes; (wall seconds, stdout)."""
    bin_dir = str(Path(sys.executable).parent)
    lazarus = shutil.which("lazarus", path=bin_dir)
    cmd = [lazarus, *argv] if ranks == 1 else \
        [shutil.which("torchrun", path=bin_dir), "--standalone", "--nproc-per-node", str(ranks), "--no-python",
         lazarus, *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - t0, proc.stdout


def _same_overlay(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    for shard in sorted(a.glob("overlay-layer-*.safetensors")):
        with safe_open(str(shard), "pt") as fa, safe_open(str(b / shard.name), "pt") as fb:
            if sorted(fa.keys()) != sorted(fb.keys()) or any(not fa.get_tensor(k).equal(fb.get_tensor(k))
                                                             for k in fa.keys()):
                return False
    return True


def run(repeats: int = 3) -> tuple[list[BenchRow], dict]:
    repeats = max(1, min(repeats, 3))
    rows: list[BenchRow] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(_write_model(tmp / "model"))
        shape = f"{LAYERS} layers x {EXPERTS} experts, gate/up [{INTER}, {HIDDEN}]"
        jobs = {
            "moe-type-analyze": lambda out: (["introspect", "moe-expert", "moe-type-analyze", "-m", model,
                                              "--no-progress", "-o", str(out / "report.json")], "report.json"),
            "moe-overlay-compress": lambda out: (["introspect", "moe-expert", "moe-overlay-compress", "-m", model,
                                                  "--no-progress", "--no-resume", "--out", str(out / "ov"),
                                                  "-o", str(out / "report.json")], "report.json"),
        }
        for op, job in jobs.items():
            seconds: dict[int, list[float]] = {1: [], 2: []}
            walls: dict[int, list[float]] = {1: [], 2: []}
            reports = {}
            for _ in range(repeats):
                for ranks in (1, 2):
                    out = tmp / f"{op}-{ranks}"
                    out.mkdir(exist_ok=True)
                    argv, name = job(out)
                    wall, _ = _command(ranks, argv)
                    report = json.loads((out / name).read_text())
                    reports[ranks] = report
                    walls[ranks].append(wall)
                    seconds[ranks].append(float(report["seconds"]))
            drop = ("seconds", "distributed", "out")
            if {k: v for k, v in reports[1].items() if k not in drop} != \
                    {k: v for k, v in reports[2].items() if k not in drop}:
                raise AssertionError(f"{op}: the 2-rank report differs from the 1-process report")
            if op == "moe-overlay-compress" and not _same_overlay(tmp / f"{op}-1" / "ov", tmp / f"{op}-2" / "ov"):
                raise AssertionError(f"{op}: the 2-rank overlay differs from the 1-process overlay")
            for ranks in (1, 2):
                wall = statistics.median(walls[ranks])
                extra = {"repeats": repeats}
                if op == "moe-type-analyze":  # compress's "seconds" is the planning step alone, not the job
                    extra.update(analysis_s=round(statistics.median(seconds[ranks]), 2),
                                 analysis_ratio=round(statistics.median(seconds[1]) / statistics.median(seconds[ranks]),
                                                      3))
                rows.append(BenchRow(op, "1 process" if ranks == 1 else f"{ranks} ranks (torchrun, gloo)", shape,
                                     "bf16", wall * 1e3, ratio_to_reference=statistics.median(walls[1]) / wall,
                                     extra=extra))
    load_after = os.getloadavg()
    notes = {"load_average_before": [round(x, 2) for x in load_before],
             "load_average_after": [round(x, 2) for x in load_after], "cpu_count": os.cpu_count(),
             "note": "shared machine: other processes ran during the measurement; median_ms is the whole command "
                     "(start-up and rendezvous included), analysis_s the time the report records"}
    return rows, notes


if __name__ == "__main__":
    from benchmarks.harness import machine_header, report_suite

    r, f = run()
    report_suite("distributed", machine_header(), r, f, Path("benchmarks/results"))
