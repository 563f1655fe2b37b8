"""Block-scaled FP8 E4M3 dequantisation: every available backend vs the torch reference and the copy floor.

Run ``python benchmarks/bench_fp8_dequant.py [--repeats N]`` for the table + JSON (``run()`` is the suite
entry point for ``python -m benchmarks`` once registered there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    BenchRow, available_backends, machine_header, measure_copy_bandwidth, median_seconds, print_table, write_json)
from lazarus_core.ops import fp8_dequant, fp8_dequant_reference  # noqa: E402
from lazarus_core.ops.fp8_dequant import _IMPLS  # noqa: E402

# DeepSeek-V3 routed expert gate/up [2048, 7168] and down [7168, 2048], 128 x 128 blocks: (batch, rows, cols).
SHAPES = {"deepseek-v3 expert gate [2048,7168]": (1, 2048, 7168), "deepseek-v3 expert down [7168,2048]": (1, 7168, 2048)}
# On a GPU one expert is a few microseconds of work: also time 16 experts' gate tensors at once.
GPU_SHAPES = {"deepseek-v3 16 experts gate [16,2048,7168]": (16, 2048, 7168)}


def run(repeats: int = 10) -> tuple[list[BenchRow], dict]:
    """Measure every shape x output dtype x available backend; returns (rows, floors)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    copy_bw = measure_copy_bandwidth(256 << 20, device=device.type)
    rows = []
    shapes = {**SHAPES, **(GPU_SHAPES if device.type == "cuda" else {})}
    for label, (b, r, c) in shapes.items():
        lead = (b,) if b > 1 else ()
        weight = torch.randint(0, 256, (*lead, r, c), dtype=torch.uint8, device=device)
        scale_inv = torch.rand(*lead, -(-r // 128), -(-c // 128), device=device)
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(*lead, r, c, dtype=dtype, device=device)
            moved = b * r * c * (1 + torch.finfo(dtype).bits // 8) + scale_inv.numel() * 4
            name = str(dtype).replace("torch.", "")
            ref_t = median_seconds(lambda: fp8_dequant_reference(weight, scale_inv, dtype=dtype), repeats=3, warmup=1,
                                   cuda_events=gpu)
            rows.append(BenchRow("fp8_dequant", "torch (reference)", label, name, ref_t * 1e3, moved / ref_t / 1e9,
                                 100 * moved / ref_t / copy_bw, 1.0))
            for backend in available_backends("fp8_dequant", _IMPLS, device):
                check = fp8_dequant(weight[..., :256, :], scale_inv[..., :2, :], dtype=dtype, backend=backend)  # correct first
                expected = fp8_dequant_reference(weight[..., :256, :], scale_inv[..., :2, :], dtype=dtype)
                torch.testing.assert_close(check, expected, equal_nan=True, rtol=0, atol=0)
                t = median_seconds(lambda: fp8_dequant(weight, scale_inv, dtype=dtype, out=out, backend=backend),
                                   repeats=repeats, cuda_events=gpu)
                rows.append(BenchRow("fp8_dequant", backend, label, name, t * 1e3, moved / t / 1e9,
                                     100 * moved / t / copy_bw, ref_t / t))
    return rows, {"copy_bandwidth_gb_s": copy_bw / 1e9, "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    header = machine_header()
    rows, floors = run(args.repeats)
    print_table("fp8_dequant", {**header, **{k: (round(v, 1) if isinstance(v, float) else v)
                                             for k, v in floors.items()}}, rows)
    path = args.out / "fp8_dequant.json"
    write_json(path, "fp8_dequant", header, rows, floors)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
