"""Streaming every expert of one projection out of a real-shaped checkpoint: decoded GB/s and the peak
resident memory above the process baseline (must stay within a few experts, not E experts).

Run ``python benchmarks/bench_checkpoint_stream.py [--repeats N] [--dir DIR] [--out DIR]`` for the
table + JSON (not part of the test run). Each measurement runs in a fresh subprocess so its peak RSS
(``ru_maxrss``) is its own. Files are read warm (just written, in the page cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import BenchRow, machine_header, measure_copy_bandwidth, print_table, write_json  # noqa: E402

# name -> (family config, projection(s) streamed, experts, [out, in] per expert as streamed)
CASES = {
    "olmoe-1b-7b layer, gate, bf16": ("olmoe", ("gate",), 64, (1024, 2048)),
    "gpt-oss-20b layer, gate_up, mxfp4": ("gpt_oss", ("gate", "up"), 32, (2880, 2880)),
    "deepseek-v3 layer (16 of 256 experts), gate, fp8": ("deepseek_v3", ("gate",), 16, (2048, 7168)),
}


def _write_case(family: str, experts: int, directory: Path) -> Path:
    """A one-layer checkpoint holding just what is streamed (the reader validates only what it reads)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    if family == "olmoe":
        config = {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "num_hidden_layers": 1,
                  "hidden_size": 2048, "intermediate_size": 1024, "num_experts": experts, "num_experts_per_tok": 8}
        for e in range(experts):
            tensors[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] = (
                torch.randn(1024, 2048, generator=g) * 0.02).to(torch.bfloat16)
    elif family == "gpt_oss":
        config = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "num_hidden_layers": 1,
                  "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": experts,
                  "num_experts_per_tok": 4, "quantization_config": {"quant_method": "mxfp4"}}
        stem = "model.layers.0.mlp.experts.gate_up_proj"
        tensors[stem + "_blocks"] = torch.randint(0, 256, (experts, 5760, 90, 16), dtype=torch.uint8, generator=g)
        tensors[stem + "_scales"] = torch.randint(118, 126, (experts, 5760, 90), dtype=torch.uint8, generator=g)
    else:
        config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 1,
                  "first_k_dense_replace": 0, "hidden_size": 7168, "moe_intermediate_size": 2048,
                  "n_routed_experts": experts, "num_experts_per_tok": 8, "n_group": 8 if experts % 8 == 0 else 1,
                  "topk_group": 4 if experts % 8 == 0 else 1,
                  "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
        for e in range(experts):
            name = f"model.layers.0.mlp.experts.{e}.gate_proj.weight"
            bits = torch.randint(0, 256, (2048, 7168), dtype=torch.uint8, generator=g)
            bits[(bits & 0x7F) == 0x7F] = 0  # no NaN codes
            tensors[name] = bits.view(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = torch.rand(16, 56, generator=g) * 1e-3
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


# Runs in a fresh interpreter: prints one JSON line with per-stream seconds and RSS figures.
_CHILD = r"""
import json, sys, time
import torch
path, projections, method, repeats = sys.argv[1], sys.argv[2].split(","), sys.argv[3], int(sys.argv[4])
from lazarus_core.models import open_moe_checkpoint
from lazarus_core.ops import fp8_dequant_reference, mxfp4_dequant_reference
from safetensors import safe_open
ckpt = open_moe_checkpoint(path)

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

# Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS, so the peak measured below is
# the streaming's own, not the import-time peak.
open("/proc/self/clear_refs", "w").write("5")
baseline = status_kb("VmRSS")

def stream_lazarus(reuse=False):
    n = 0
    for p in projections:
        for e, w in ckpt.iter_experts(0, p, reuse=reuse):
            n += w.numel() * w.element_size()
    return n

def stream_safe_open():
    # the obvious alternative: safe_open (mmap) + get_slice per expert + torch reference decode
    n = 0
    spec = ckpt.spec
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        for p in projections:
            for e in range(spec.num_experts):
                if spec.family == "gpt_oss":
                    stem = "model.layers.0.mlp.experts.gate_up_proj"
                    start = 0 if p == "gate" else 1
                    b = f.get_slice(stem + "_blocks")[e][start::2]
                    s = f.get_slice(stem + "_scales")[e][start::2]
                    w = mxfp4_dequant_reference(b, s).reshape(b.shape[0], -1)
                else:
                    name = f"model.layers.0.mlp.experts.{e}.{p}_proj.weight"
                    t = f.get_tensor(name)
                    w = fp8_dequant_reference(t, f.get_tensor(name + "_scale_inv")) if t.dtype == torch.float8_e4m3fn \
                        else t.to(torch.float32)
                n += w.numel() * w.element_size()
                del w
    return n

fn = {"lazarus": stream_lazarus, "lazarus reuse=True": lambda: stream_lazarus(True),
      "safe_open+torch": stream_safe_open}[method]
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); n = fn(); times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": times, "decoded_bytes": n, "baseline_rss": baseline, "peak_rss": status_kb("VmHWM")}))
"""


def _measure(path: Path, projections: tuple[str, ...], method: str, repeats: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), ",".join(projections), method, str(repeats)],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(repeats: int = 3, directory: Path | None = None) -> tuple[list[BenchRow], dict]:
    """Generate each case, stream it with lazarus and with safe_open + torch reference; return rows + floors."""
    import statistics

    copy_bw = measure_copy_bandwidth(256 << 20)
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for label, (family, projections, experts, (out_dim, in_dim)) in CASES.items():
            path = _write_case(family, experts, Path(tmp) / family)
            expert_bytes = out_dim * in_dim * 4
            # The reference path is slow (torch MXFP4 decode): one timed run is enough for the ratio.
            results = {"safe_open+torch": _measure(path, projections, "safe_open+torch", 1),
                       "lazarus": _measure(path, projections, "lazarus", repeats),
                       "lazarus reuse=True": _measure(path, projections, "lazarus reuse=True", repeats)}
            ref_t = statistics.median(results["safe_open+torch"]["seconds"])
            for method, r in results.items():
                t = statistics.median(r["seconds"])
                extra_rss = r["peak_rss"] - r["baseline_rss"]
                gbps = r["decoded_bytes"] / t / 1e9
                rows.append(BenchRow(
                    op=f"stream {label}", backend=method, shape=f"{experts * len(projections)} x [{out_dim}, {in_dim}]",
                    dtype="fp32 out", median_ms=t * 1e3, gb_per_s=gbps, pct_of_floor=100 * gbps * 1e9 / copy_bw,
                    ratio_to_reference=ref_t / t,
                    extra={"peak_rss_above_baseline_mb": extra_rss / 2**20,
                           "peak_rss_in_decoded_experts": extra_rss / expert_bytes,
                           "decoded_expert_mb": expert_bytes / 2**20,
                           "all_experts_decoded_mb": r["decoded_bytes"] / 2**20,
                           "file_mb": (path / "model.safetensors").stat().st_size / 2**20}))
            del results
    return rows, {"copy_bandwidth_gb_s": copy_bw / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the generated checkpoints (temp)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    header = machine_header()
    rows, floors = run(args.repeats, args.dir)
    print_table("checkpoint_stream", {**header, **{k: round(v, 1) for k, v in floors.items()}}, rows)
    for r in rows:
        print(f"  {r.op} [{r.backend}]: peak RSS above baseline {r.extra['peak_rss_above_baseline_mb']:.0f} MB = "
              f"{r.extra['peak_rss_in_decoded_experts']:.1f} decoded experts "
              f"(all experts decoded: {r.extra['all_experts_decoded_mb']:.0f} MB)")
    path = args.out / "checkpoint_stream.json"
    write_json(path, "checkpoint_stream", header, rows, floors)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
