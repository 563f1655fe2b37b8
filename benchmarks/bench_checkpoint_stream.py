"""Streaming every expert of one projection out of a real-shaped checkpoint: decoded GB/s and the peak
resident memory above the process baseline (must stay within a few experts, not E experts).

Also the row-chunk sweep of the cosine Gram (``MoeCheckpoint.expert_rows`` over every expert, chunk by chunk)
at DeepSeek-V3 FP8 expert shape, against decoding each expert whole once (the least decoding work): a ratio
near 1 means each scale-block row is decoded once, not once per chunk.

Run ``python benchmarks/bench_checkpoint_stream.py [--repeats N] [--dir DIR] [--out DIR] [--rows-only]`` for
the table + JSON (not part of the test run). Each streaming measurement runs in a fresh subprocess so its peak
RSS (``ru_maxrss``) is its own. Files are read warm (just written, in the page cache).
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

from benchmarks.floors import measure_memory_floors  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    BenchRow,
    machine_header,
    median_seconds,
    print_table,
    write_json,
)

# name -> (family config, projection(s) streamed, experts, [out, in] per expert as streamed)
CASES = {
    "olmoe-1b-7b layer, gate, bf16": ("olmoe", ("gate",), 64, (1024, 2048)),
    "gpt-oss-20b layer, gate_up, mxfp4": ("gpt_oss", ("gate", "up"), 32, (2880, 2880)),
    "deepseek-v3 layer (16 of 256 experts), gate, fp8": ("deepseek_v3", ("gate",), 16, (2048, 7168)),
}


# DeepSeek-V3 routed expert [out, in] per projection, and the row chunks the sweep reads them in (the cosine
# Gram's chunk is 2 x out / E rows rounded to the 128-row scale block: 128 rows at E = 256).
ROW_SWEEP = {"gate": (2048, 7168), "down": (7168, 2048)}
ROW_CHUNKS = (128, 512, 2048)
ROW_SWEEP_EXPERTS = 8


def _write_case(family: str, experts: int, directory: Path, projections: tuple[str, ...] = ("gate",)) -> Path:
    """A one-layer checkpoint holding just what is streamed (the reader validates only what it reads);
    ``projections`` (DeepSeek-V3 only): which expert projections to write."""
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
            for projection in projections:
                name = f"model.layers.0.mlp.experts.{e}.{projection}_proj.weight"
                rows, cols = ROW_SWEEP[projection]
                bits = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g)
                bits[(bits & 0x7F) == 0x7F] = 0  # no NaN codes
                tensors[name] = bits.view(torch.float8_e4m3fn)
                tensors[name + "_scale_inv"] = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) * 1e-3
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


def run(repeats: int = 3, directory: Path | None = None, rows_only: bool = False) -> tuple[list[BenchRow], dict]:
    """Generate each case, stream it with lazarus and with safe_open + torch reference (unless ``rows_only``),
    then the row-chunk sweep (:func:`run_row_sweep`); return rows + floors."""
    import statistics

    mem = measure_memory_floors(256 << 20)
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for label, (family, projections, experts, (out_dim, in_dim)) in ({} if rows_only else CASES).items():
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
                # floor: the file's bytes read (page cache) and the decoded fp32 experts written
                file_bytes = (path / "model.safetensors").stat().st_size
                floor_t = mem.seconds(file_bytes, r["decoded_bytes"])
                rows.append(BenchRow(
                    op=f"stream {label}", backend=method, shape=f"{experts * len(projections)} x [{out_dim}, {in_dim}]",
                    dtype="fp32 out", median_ms=t * 1e3, gb_per_s=gbps, pct_of_floor=100 * floor_t / t,
                    ratio_to_reference=ref_t / t,
                    extra={"floor": mem.bound(file_bytes, r["decoded_bytes"]),"peak_rss_above_baseline_mb": extra_rss / 2**20,
                           "peak_rss_in_decoded_experts": extra_rss / expert_bytes,
                           "decoded_expert_mb": expert_bytes / 2**20,
                           "all_experts_decoded_mb": r["decoded_bytes"] / 2**20,
                           "file_mb": (path / "model.safetensors").stat().st_size / 2**20}))
            del results
    return rows + run_row_sweep(repeats, directory), mem.to_dict()


def run_row_sweep(repeats: int = 3, directory: Path | None = None) -> list[BenchRow]:
    """Time ``expert_rows`` over all rows of every expert in chunks (Gram order: each chunk of every expert, then
    the next chunk) against ``expert_weight`` of each expert once, at DeepSeek-V3 FP8 shape."""
    from lazarus_core.models import open_moe_checkpoint

    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = _write_case("deepseek_v3", ROW_SWEEP_EXPERTS, Path(tmp) / "deepseek_v3", tuple(ROW_SWEEP))
        ckpt = open_moe_checkpoint(path)
        for projection, (out_dim, in_dim) in ROW_SWEEP.items():
            decoded = ROW_SWEEP_EXPERTS * out_dim * in_dim * 4

            def whole(projection=projection):
                for e in range(ROW_SWEEP_EXPERTS):
                    ckpt.expert_weight(0, projection, e)

            def chunked(chunk: int, projection=projection, out_dim=out_dim):
                for start in range(0, out_dim, chunk):
                    for e in range(ROW_SWEEP_EXPERTS):
                        ckpt.expert_rows(0, projection, e, start, min(out_dim, start + chunk))

            whole_t = median_seconds(whole, repeats=repeats, warmup=1)
            shape = f"{ROW_SWEEP_EXPERTS} x [{out_dim}, {in_dim}]"
            rows.append(BenchRow(op=f"deepseek-v3 {projection} experts, fp8", backend="expert_weight (whole)",
                                 shape=shape, dtype="fp32 out", median_ms=whole_t * 1e3,
                                 gb_per_s=decoded / whole_t / 1e9, ratio_to_reference=1.0))
            for chunk in ROW_CHUNKS:
                t = median_seconds(lambda chunk=chunk: chunked(chunk), repeats=repeats, warmup=1)
                rows.append(BenchRow(op=f"deepseek-v3 {projection} experts, fp8", backend=f"expert_rows x {chunk}",
                                     shape=shape, dtype="fp32 out", median_ms=t * 1e3, gb_per_s=decoded / t / 1e9,
                                     ratio_to_reference=whole_t / t, extra={"chunk_rows": chunk,
                                                                            "chunks": -(-out_dim // chunk)}))
        ckpt.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the generated checkpoints (temp)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rows-only", action="store_true", help="only the DeepSeek-V3 row-chunk sweep")
    args = parser.parse_args()
    header = machine_header()
    rows, floors = run(args.repeats, args.dir, args.rows_only)
    print_table("checkpoint_stream", {**header, **{k: round(v, 1) for k, v in floors.items()}}, rows)
    for r in rows:
        if "peak_rss_above_baseline_mb" not in r.extra:
            continue
        print(f"  {r.op} [{r.backend}]: peak RSS above baseline {r.extra['peak_rss_above_baseline_mb']:.0f} MB = "
              f"{r.extra['peak_rss_in_decoded_experts']:.1f} decoded experts "
              f"(all experts decoded: {r.extra['all_experts_decoded_mb']:.0f} MB)")
    path = args.out / "checkpoint_stream.json"
    write_json(path, "checkpoint_stream", header, rows, floors)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
