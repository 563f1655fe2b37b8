"""MXFP4 dequantisation: every available backend vs the torch reference and the copy-bandwidth floor.

Run `python -m benchmarks mxfp4_dequant` for the table + JSON; `pytest benchmarks/bench_mxfp4_dequant.py
--benchmark-enable` runs the pytest-benchmark version.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import BenchRow, available_backends, measure_copy_bandwidth, median_seconds
from lazarus_core.ops import mxfp4_dequant, mxfp4_dequant_reference
from lazarus_core.ops.mxfp4_dequant import _IMPLS

# gpt-oss-20b gate_up_proj: 32 experts x 5760 rows x 90 blocks (2880 inputs); and one expert of it.
SHAPES = {"gpt-oss-20b gate_up [32,5760,90,16]": (32, 5760, 90), "one expert [5760,90,16]": (5760, 90)}


def _inputs(lead: tuple[int, ...], device: str):
    blocks = torch.randint(0, 256, (*lead, 16), dtype=torch.uint8, device=device)
    scales = torch.randint(110, 140, lead, dtype=torch.uint8, device=device)
    return blocks, scales


def _bytes_moved(lead: tuple[int, ...], dtype: torch.dtype) -> int:
    n_blocks = 1
    for d in lead:
        n_blocks *= d
    return n_blocks * (16 + 1) + n_blocks * 32 * torch.finfo(dtype).bits // 8


def run(repeats: int = 10) -> tuple[list[BenchRow], dict]:
    """Measure every shape x output dtype x available backend; returns (rows, floors)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    copy_bw = measure_copy_bandwidth(device=device.type)
    rows = []
    for label, lead in SHAPES.items():
        blocks, scales = _inputs(lead, device.type)
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty((*lead[:-1], lead[-1] * 32), dtype=dtype, device=device)
            moved = _bytes_moved(lead, dtype)
            big = blocks.numel() > 50_000_000
            ref_t = median_seconds(lambda: mxfp4_dequant_reference(blocks, scales, dtype), repeats=3 if big else repeats,
                                   warmup=1, cuda_events=gpu)
            rows.append(BenchRow("mxfp4_dequant", "torch (reference)", label, str(dtype).replace("torch.", ""),
                                 ref_t * 1e3, moved / ref_t / 1e9, 100 * moved / ref_t / copy_bw, 1.0))
            for backend in available_backends("mxfp4_dequant", _IMPLS, device):
                expected = mxfp4_dequant_reference(blocks[:2], scales[:2], dtype)
                check = mxfp4_dequant(blocks[:2], scales[:2], dtype=dtype, backend=backend)
                torch.testing.assert_close(check, expected, equal_nan=True, rtol=0, atol=0)  # correctness first
                t = median_seconds(lambda: mxfp4_dequant(blocks, scales, dtype=dtype, out=out, backend=backend),
                                   repeats=repeats, cuda_events=gpu)
                rows.append(BenchRow("mxfp4_dequant", backend, label, str(dtype).replace("torch.", ""), t * 1e3,
                                     moved / t / 1e9, 100 * moved / t / copy_bw, ref_t / t))
            del out
    return rows, {"copy_bandwidth_gb_s": copy_bw / 1e9, "device": device.type}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bench_mxfp4_dequant_one_expert(benchmark, backend):
    blocks, scales = _inputs(SHAPES["one expert [5760,90,16]"], "cpu")
    out = torch.empty(5760, 90 * 32)
    benchmark(mxfp4_dequant, blocks, scales, out=out, backend=backend)
