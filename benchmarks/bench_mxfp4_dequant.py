"""MXFP4 dequantisation: every available backend vs the torch reference and the memory floor
(blocks + scales read, output written: benchmarks/floors.py).

Run `python -m benchmarks mxfp4_dequant` for the table + JSON; `pytest benchmarks/bench_mxfp4_dequant.py
--benchmark-enable` runs the pytest-benchmark version.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.floors import measure_memory_floors
from benchmarks.harness import BenchRow, available_backends, median_seconds
from lazarus_core.ops import mxfp4_dequant, mxfp4_dequant_reference
from lazarus_core.ops.mxfp4_dequant import _IMPLS

# gpt-oss-20b gate_up_proj: 32 experts x 5760 rows x 90 blocks (2880 inputs); and one expert of it.
SHAPES = {"gpt-oss-20b gate_up [32,5760,90,16]": (32, 5760, 90), "one expert [5760,90,16]": (5760, 90)}


def _inputs(lead: tuple[int, ...], device: str):
    blocks = torch.randint(0, 256, (*lead, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(110, 140, lead, dtype=torch.uint8, device=device)
    return blocks, scales


def _bytes_moved(lead: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int]:
    """(bytes read: blocks + scales, bytes written: the decoded values)."""
    n_blocks = 1
    for d in lead:
        n_blocks *= d
    return n_blocks * (16 + 1), n_blocks * 32 * torch.finfo(dtype).bits // 8


def run(repeats: int = 10) -> tuple[list[BenchRow], dict]:
    """Measure every shape x output dtype x available backend; returns (rows, floors)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    mem = measure_memory_floors(device=device.type)
    rows = []
    for label, lead in SHAPES.items():
        blocks, scales = _inputs(lead, device.type)
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty((*lead[:-1], lead[-1] * 32), dtype=dtype, device=device)
            read, written = _bytes_moved(lead, dtype)
            moved, floor_t, bound = read + written, mem.seconds(read, written), mem.bound(read, written)
            big = blocks.numel() > 50_000_000
            ref_t = median_seconds(lambda: mxfp4_dequant_reference(blocks, scales, dtype), repeats=3 if big else repeats,
                                   warmup=1, cuda_events=gpu)
            rows.append(BenchRow("mxfp4_dequant", "torch (reference)", label, str(dtype).replace("torch.", ""),
                                 ref_t * 1e3, moved / ref_t / 1e9, 100 * floor_t / ref_t, 1.0, {"floor": bound}))
            for backend in available_backends("mxfp4_dequant", _IMPLS, device):
                expected = mxfp4_dequant_reference(blocks[:2], scales[:2], dtype)
                check = mxfp4_dequant(blocks[:2], scales[:2], dtype=dtype, backend=backend)
                torch.testing.assert_close(check, expected, equal_nan=True, rtol=0, atol=0)  # correctness first
                t = median_seconds(lambda: mxfp4_dequant(blocks, scales, dtype=dtype, out=out, backend=backend),
                                   repeats=repeats, cuda_events=gpu)
                rows.append(BenchRow("mxfp4_dequant", backend, label, str(dtype).replace("torch.", ""), t * 1e3,
                                     moved / t / 1e9, 100 * floor_t / t, ref_t / t, {"floor": bound}))
            del out
    return rows, {**mem.to_dict(), "device": device.type}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bench_mxfp4_dequant_one_expert(benchmark, backend):
    blocks, scales = _inputs(SHAPES["one expert [5760,90,16]"], "cpu")
    out = torch.empty(5760, 90 * 32)
    benchmark(mxfp4_dequant, blocks, scales, out=out, backend=backend)
