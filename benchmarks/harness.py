"""Shared benchmark machinery: timing (warm-up, repeats, median), the fp32 matmul-rate floor (the memory
floors - streaming read, non-temporal write and copy - are in benchmarks.floors), a header describing the
run, and table + JSON output."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], *, repeats: int = 10, warmup: int = 2, min_time: float = 0.0,
                   cuda_events: bool = False, before: Callable[[], object] | None = None) -> float:
    """Median time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    By default the host clock (CUDA-synchronised where a device exists). With ``cuda_events`` (GPU work),
    CUDA events on the current stream around each call: the GPU timeline from the first launch to the last,
    host launch gaps included, without a host sync's own latency. ``before`` (e.g. a :class:`CacheFlusher`)
    runs ahead of every timed call, outside the timing."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time:
        if before is not None:
            before()
            if cuda:
                torch.cuda.synchronize()
        if cuda_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(fns: dict, *, repeats: int = 10, warmup: int = 1, cuda_events: bool = False,
                      before: dict | None = None) -> dict:
    """Time of each ``fns[key]()`` in each of ``repeats`` rounds that run every function once, in turn (after
    ``warmup`` such rounds): paths compared with each other see the same machine state, which drifts on a
    shared host. Each round runs them in a fresh random order (seeded: the same orders every run), so no function
    always follows the same one: what ran just before a call changes it (at T=1 on the CPU, the overlay forward
    took 3 % longer, and a bare 22 MB read 5 % longer, right after the fp32 twin's 117 MB than after a 22 MB read;
    a fixed order, or one that only rotates, gives a path the same predecessor in (almost) every round). Each
    call is timed as :func:`median_seconds` times one; ``before[key]`` (where given) runs ahead of each call of
    ``fns[key]``, untimed.

    Returns
    -------
    dict
        key -> list of ``repeats`` seconds, round by round (entry r of every list is from round r)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    keys, rng = list(fns), random.Random(0)
    times: dict = {key: [] for key in keys}
    for _ in range(repeats):
        for key in rng.sample(keys, len(keys)):
            times[key].append(median_seconds(fns[key], repeats=1, warmup=0, cuda_events=cuda_events,
                                             before=(before or {}).get(key)))
    return times


def interleaved_medians(fns: dict, **kwargs) -> dict:
    """The median over the rounds of :func:`interleaved_times` (same arguments): key -> seconds."""
    return {key: statistics.median(v) for key, v in interleaved_times(fns, **kwargs).items()}


def paired_ratio_ci(num: list, den: list, *, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """``median(num) / median(den)`` of two paired per-round series, with a percentile bootstrap interval that
    resamples whole rounds (the pair of round r stays together, so the drift both saw cancels).

    Parameters
    ----------
    num, den : list of float
        The same number of rounds each (e.g. seconds from :func:`interleaved_times`), den > 0.
    level : float
        The interval's coverage.

    Returns
    -------
    (estimate, low, high) : tuple of float
    """
    import numpy as np

    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_ratio_ci: num and den must be two non-empty series of the same length, got "
                         f"{a.shape} and {b.shape}")
    if not (b > 0).all():
        raise ValueError("paired_ratio_ci: den must be positive")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.median(a) / np.median(b)), float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))


class CacheFlusher:
    """A callable that evicts the bytes of the given tensors from every CPU cache level (``_C.flush_cache``:
    clflushopt per line), so the next call reads them from DRAM while everything else (the interpreter, the
    activations) stays cached: a model decoding layer after layer meets each layer's weights cold. A host whose
    L3 holds the whole layer (260 MB here) would otherwise serve a repeated call from the L3, which the DRAM read
    floor does not bound. On the machine this was written on, a 22 MB read after the flush ran at 98.5% of the
    1 GB read floor (and at 195% without it); flushing costs about 20 ms per GB, outside the timing.

    Parameters
    ----------
    tensors : iterable of torch.Tensor
        Contiguous CPU tensors of any dtype (None entries are skipped).
    """

    def __init__(self, tensors):
        from lazarus_core import _C

        self._flush = _C.flush_cache
        self._arrays = []
        for t in tensors:
            if t is None:
                continue
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"CacheFlusher: tensors must be contiguous CPU tensors, got {t.device} "
                                 f"{list(t.shape)} (contiguous={t.is_contiguous()})")
            self._arrays.append(t.detach().reshape(-1).view(torch.uint8).numpy())
        self.nbytes = sum(a.nbytes for a in self._arrays)

    def __call__(self) -> None:
        for a in self._arrays:
            self._flush(a)


def available_backends(op: str, impls: dict, device: torch.device) -> list[str]:
    """The compiled backends of ``op`` that run on ``device`` (never Triton's CPU interpreter, which
    measures Python rather than a kernel)."""
    from lazarus_core import BackendUnavailableError
    from lazarus_core.ops._backends import select_backend

    names = []
    for name in ("cpu", "cuda", "triton"):
        if name == "triton" and device.type == "cpu":
            continue
        try:
            select_backend(op, name, device, impls)
        except (BackendUnavailableError, ValueError):
            continue
        names.append(name)
    return names


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_header() -> dict:
    """What the numbers were measured on."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclass
class BenchRow:
    """One measured configuration; ``ratio_to_reference`` is reference time / this time (same run)."""

    op: str
    backend: str
    shape: str
    dtype: str
    median_ms: float
    gb_per_s: float | None = None
    pct_of_floor: float | None = None
    ratio_to_reference: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def print_table(title: str, header: dict, rows: list[BenchRow]) -> None:
    """Render rows with rich, under a one-line description of the machine."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    console.print(f"[bold]{title}[/bold]  " + ", ".join(f"{k}={v}" for k, v in header.items() if v is not None))
    table = Table()
    for col in ("op", "backend", "shape", "dtype", "median ms", "GB/s", "% of floor", "x reference"):
        table.add_column(col, justify="right" if col not in ("op", "backend", "shape", "dtype") else "left")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        table.add_row(r.op, r.backend, r.shape, r.dtype, fmt(r.median_ms, ".2f"), fmt(r.gb_per_s, ".1f"),
                      fmt(r.pct_of_floor, ".0f"), fmt(r.ratio_to_reference, ".1f"))
    console.print(table)


def write_json(path: Path, title: str, header: dict, rows: list[BenchRow], floors: dict) -> None:
    """Write the run to ``path`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"title": title, "header": header, "floors": floors,
                               "rows": [r.to_dict() for r in rows]}, indent=2))
    os.replace(tmp, path)


def report_suite(name: str, header: dict, rows: list[BenchRow], floors: dict, out_dir: Path) -> Path:
    """Print a suite's table (machine header and floors above it) and write ``out_dir/<name>.json``.

    Raises
    ------
    benchmarks.floors.FloorExceeded
        A row reports more than 100% of its floor (a benchmark bug), after the table and JSON are written.
    """
    print_table(name, {**header, **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in floors.items()}}, rows)
    path = Path(out_dir) / f"{name}.json"
    write_json(path, name, header, rows, floors)
    print(f"wrote {path}")
    from benchmarks.floors import check_floors

    check_floors(name, rows)  # after writing: the rows that beat their floor stay on record
    return path
