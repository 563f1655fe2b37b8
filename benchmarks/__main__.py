"""`python -m benchmarks [SUITE ...] [--repeats N] [--out DIR]`: run suites, print tables, write JSON."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from benchmarks.floors import FloorExceeded
from benchmarks.harness import machine_header, report_suite

SUITES = {
    "trigram": "benchmarks.bench_trigram",
    "mxfp4_dequant": "benchmarks.bench_mxfp4_dequant",
    "expert_spectra": "benchmarks.bench_expert_spectra",
    "checkpoint_stream": "benchmarks.bench_checkpoint_stream",
    "fp8_dequant": "benchmarks.bench_fp8_dequant",
    "capture": "benchmarks.bench_capture",
    "overlay_moe": "benchmarks.bench_overlay_moe",
    "router_metrics": "benchmarks.bench_router_metrics",
    "dynamics": "benchmarks.bench_dynamics",
    "distributed": "benchmarks.bench_distributed",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suites", nargs="*", choices=[*SUITES, []], help="suites to run (default: all)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per configuration (median reported)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for the JSON files")
    args = parser.parse_args()
    header = machine_header()
    failures = []
    for name in args.suites or list(SUITES):
        rows, floors = importlib.import_module(SUITES[name]).run(repeats=args.repeats)
        try:
            report_suite(name, header, rows, floors, args.out)
        except FloorExceeded as exc:  # run the other suites, then fail the run
            print(f"FLOOR EXCEEDED: {exc}", file=sys.stderr)
            failures.append(name)
    if failures:
        sys.exit(f"benchmark run failed: {', '.join(failures)} beat their floors (see above)")


if __name__ == "__main__":
    main()
