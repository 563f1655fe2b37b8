"""In-process A/B of CPU extension builds on the one-call overlay forward (the benchmark's gpt-oss-20b layer, T=1).

On a shared machine the speed of the same kernel drifts 1.5-2x within minutes, so two builds timed one after the
other cannot be compared. This loads each build's ``_C`` extension by path into ONE process and calls
``overlay_moe_small`` with each of them in turn, round after round, so every build sees the same machine state.

    python -m benchmarks.ab_extensions [NAME=DIR ...] [--rounds 400] [--cold [--stream]] [--modes int16,int8]
                                       [--forms both] [--tokens T]

``DIR`` is a directory holding a built ``_C.cpython-*.so`` (an installed or unpacked ``lazarus_core``). To get
one for an older revision::

    git worktree add /tmp/lz-old REV
    pip wheel --no-deps --no-build-isolation -w /tmp/lz-old/wheel /tmp/lz-old
    unzip -o -q -d /tmp/lz-old/pkg /tmp/lz-old/wheel/*.whl
    python -m benchmarks.ab_extensions old=/tmp/lz-old/pkg/lazarus_core

The installed build is always included (as ``current``, in every token mode asked for; other builds run their
default integer mode, code 1); ``--forms both`` times the installed build's integer kernel in each form the CPU
runs: AVX-512 VBMI (the zmm form's ``vpermb`` decode), AVX-512 VNNI, ymm VNNI (AVX-VNNI, or the EVEX form) and
AVX2 (``set_avx512_vbmi``, ``set_avx512_vnni``, ``set_avx_vnni``; ``native`` runs the widest). ``--cold`` flushes
the layer's tensors from every cache level before every call (``harness.CacheFlusher``), so the 22 MB a call
reads come from DRAM as they do when a many-layer model decodes; ``--stream`` also reads a flushed 256 MB buffer
ahead of each call (untimed), as the benchmark's same-round read-floor probe and fp32 twin do for the calls after
them: it evicts everything else from every cache level too (the code, the interpreter, the page-table lines), and
at T=1 it made the same call 1.1-1.4x as slow as the flush alone. ``--tokens`` times T tokens (at most
``GEMV_MAX_ROWS``, the one-call forward's range) instead of one. Prints the median milliseconds per build and its
paired ratio to the first (a 95 % bootstrap interval over whole rounds), and
writes nothing.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import statistics
import time
from pathlib import Path

import torch


def _load(directory: str, name: str):
    """The ``_C`` extension module under ``directory``, loaded as a module of its own (``name._C``)."""
    found = sorted(glob.glob(str(Path(directory) / "_C.cpython-*.so")))
    if not found:
        raise SystemExit(f"ab_extensions: no _C.cpython-*.so in {directory}")
    spec = importlib.util.spec_from_file_location(f"{name}._C", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _call(ext, args: tuple, mode: int) -> None:
    try:
        ext.overlay_moe_small(*args[:-1], mode, args[-1])
    except TypeError:  # builds before the token-mode codes took a bool ("int16")
        ext.overlay_moe_small(*args[:-1], bool(mode), args[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab_extensions", description=__doc__.split("\n")[0])
    parser.add_argument("builds", nargs="*", metavar="NAME=DIR", help="other builds to time against the installed one")
    parser.add_argument("--rounds", type=int, default=400, help="calls per build (the first 20 are not counted)")
    parser.add_argument("--cold", action="store_true",
                        help="flush the layer's tensors from the caches before every call")
    parser.add_argument("--stream", action="store_true",
                        help="with --cold: a flushed 256 MB streaming read ahead of every call too (evicts all caches)")
    parser.add_argument("--modes", default="int16,int8", help="token modes of the installed build")
    parser.add_argument("--forms", choices=("native", "both"), default="native",
                        help="both: every form of the installed build's integer kernel this CPU runs")
    parser.add_argument("--tokens", type=int, default=1, help="tokens per call (1..GEMV_MAX_ROWS)")
    args = parser.parse_args()

    from benchmarks.bench_overlay_moe import H, _routing, _tensors, make_overlay
    from benchmarks.harness import CacheFlusher, paired_ratio_ci
    from lazarus_core.ops import overlay_moe as op

    if not 1 <= args.tokens <= op.GEMV_MAX_ROWS:
        parser.error(f"--tokens must be in 1..{op.GEMV_MAX_ROWS} (the one-call forward's range), got {args.tokens}")
    ov = make_overlay()
    ids, w = _routing(args.tokens, 1)
    x = torch.randn(args.tokens, H, generator=torch.Generator().manual_seed(2))
    y = torch.empty_like(x)
    call_args = (x.numpy(), ids.numpy(), w.to(torch.float32).numpy(), *op._small_weight_args(ov),
                 op.ACTIVATIONS[ov.activation], ov.alpha, ov.limit, y.numpy())
    current = op.cpu_extension()
    # (avx_vnni, avx512_vnni, avx512_vbmi allowed) per form; the AVX-512 ones where the CPU has them
    forms = {"native": None} if args.forms == "native" else {
        **({"avx512_vbmi": (True, True, True)} if current.cpu_has_avx512_vbmi() else {}),
        **({"avx512_vnni": (True, True, False)} if current.cpu_has_avx512_vnni() else {}),
        "avx_vnni": (True, False, False), "avx2": (False, False, False)}
    if args.forms == "both" and not current.cpu_has_ymm_vnni():
        raise SystemExit("ab_extensions: --forms both needs a CPU with AVX-VNNI or AVX-512 VNNI")
    variants = {f"current {m}" + ("" if vnni is None else f" {form}"): (current, op._MXFP4_TOKEN_MODES[m], vnni)
                for m in args.modes.split(",") for form, vnni in forms.items()}
    for spec in args.builds:
        name, _, directory = spec.partition("=")
        if not directory:
            raise SystemExit(f"ab_extensions: expected NAME=DIR, got {spec!r}")
        variants[name] = (_load(directory, f"ab_{name}"), 1, None)
    if args.stream and not args.cold:
        parser.error("--stream needs --cold")
    evict = CacheFlusher(_tensors(ov)) if args.cold else None
    if args.stream:
        from benchmarks.bench_overlay_moe import FLOOR_PROBE_BYTES

        probe = torch.ones(FLOOR_PROBE_BYTES // 4, dtype=torch.float32)
        flush_probe, probe_np = CacheFlusher([probe]), probe.numpy()
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for key, (ext, mode, vnni) in variants.items():
            if vnni is not None:
                ext.set_avx_vnni(vnni[0])
                ext.set_avx512_vnni(vnni[1])
                ext.set_avx512_vbmi(vnni[2])
            if args.stream:
                flush_probe()
                current.stream_read(probe_np, prefetch=0)
            if evict is not None:
                evict()
            t0 = time.perf_counter()
            _call(ext, call_args, mode)
            times[key].append(time.perf_counter() - t0)
    current.set_avx_vnni(True)
    current.set_avx512_vnni(True)
    current.set_avx512_vbmi(True)
    state = (f"its {evict.nbytes / 1e6:.0f} MB flushed from the caches" if evict is not None
             else "call repeated (the layer stays in cache)")
    if args.stream:
        state += " after a 256 MB streaming read"

    print(f"overlay_moe_small, T={args.tokens}, {state}, median of {args.rounds - 20} rounds "
          f"(and the paired ratio to the first, 95 % CI over whole rounds):")
    first = next(iter(times))
    for key, ts in times.items():
        ratio = "" if key == first else \
            " {:.3f}x ({:.3f}-{:.3f})".format(*paired_ratio_ci(ts[20:], times[first][20:]))
        print(f"  {key:24s} {statistics.median(ts[20:]) * 1e3:8.3f} ms{ratio}")


if __name__ == "__main__":
    main()
