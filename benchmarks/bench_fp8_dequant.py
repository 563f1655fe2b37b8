"""Block-scaled FP8 E4M3 dequantisation: every available backend vs the torch reference and the memory
floor (codes + scales read, output written: benchmarks/floors.py).

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

from benchmarks.floors import measure_memory_floors  # noqa: E402
from benchmarks.harness import BenchRow, available_backends, machine_header, median_seconds, report_suite  # noqa: E402
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
    mem = measure_memory_floors(device=device.type)
    rows = []
    shapes = {**SHAPES, **(GPU_SHAPES if device.type == "cuda" else {})}
    for label, (b, r, c) in shapes.items():
        lead = (b,) if b > 1 else ()
        weight = torch.randint(0, 256, (*lead, r, c), dtype=torch.uint8, device=device)
        scale_inv = torch.rand(*lead, -(-r // 128), -(-c // 128), device=device)
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(*lead, r, c, dtype=dtype, device=device)
            read, written = b * r * c + scale_inv.numel() * 4, b * r * c * torch.finfo(dtype).bits // 8
            moved, floor_t, bound = read + written, mem.seconds(read, written), mem.bound(read, written)
            name = str(dtype).replace("torch.", "")
            ref_t = median_seconds(lambda: fp8_dequant_reference(weight, scale_inv, dtype=dtype), repeats=3, warmup=1,
                                   cuda_events=gpu)
            rows.append(BenchRow("fp8_dequant", "torch (reference)", label, name, ref_t * 1e3, moved / ref_t / 1e9,
                                 100 * floor_t / ref_t, 1.0, {"floor": bound}))
            for backend in available_backends("fp8_dequant", _IMPLS, device):
                check = fp8_dequant(weight[..., :256, :], scale_inv[..., :2, :], dtype=dtype, backend=backend)  # correct first
                expected = fp8_dequant_reference(weight[..., :256, :], scale_inv[..., :2, :], dtype=dtype)
                torch.testing.assert_close(check, expected, equal_nan=True, rtol=0, atol=0)
                t = median_seconds(lambda: fp8_dequant(weight, scale_inv, dtype=dtype, out=out, backend=backend),
                                   repeats=repeats, cuda_events=gpu)
                rows.append(BenchRow("fp8_dequant", backend, label, name, t * 1e3, moved / t / 1e9,
                                     100 * floor_t / t, ref_t / t, {"floor": bound}))
    return rows, {**mem.to_dict(), "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    header = machine_header()
    rows, floors = run(args.repeats)
    report_suite("fp8_dequant", header, rows, floors, args.out)


if __name__ == "__main__":
    main()
