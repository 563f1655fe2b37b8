"""Benchmarks of lazarus-core kernels: `python -m benchmarks` prints a table and writes JSON."""
