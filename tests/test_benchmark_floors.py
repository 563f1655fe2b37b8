"""The memory probes behind the benchmark floors compute what they claim, and a row above its floor fails."""

import numpy as np
import pytest

from benchmarks.floors import FloorExceeded, MemoryFloors, check_floors, measure_memory_floors
from benchmarks.harness import BenchRow
from lazarus_core import _C


@pytest.mark.parametrize("n", [0, 1, 7, 33, 1000, (1 << 18) * 2 + 5])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_probes_match_numpy_at_odd_sizes_and_unaligned_starts(n, offset):
    rng = np.random.default_rng(n + offset)
    src = rng.standard_normal(n + offset).astype(np.float32)[offset:]
    dst_full = np.full(n + offset + 1, -7.0, dtype=np.float32)
    dst = dst_full[offset:offset + n]
    _C.stream_copy(src, dst)
    np.testing.assert_array_equal(dst, src)
    assert dst_full[offset + n] == -7.0                  # no write past the end
    _C.stream_fill(dst, 2.5)
    assert (dst == 2.5).all() and dst_full[offset + n] == -7.0
    want = float(src.astype(np.float64).sum())
    for policy in (0, 1, 2, 3):                          # every prefetch policy reads the same bytes
        assert _C.stream_read(src, prefetch=policy) == pytest.approx(want, rel=1e-5, abs=1e-3)


def test_probes_name_the_bad_argument():
    with pytest.raises(TypeError, match="dst"):
        _C.stream_fill(np.zeros(4, np.float64), 1.0)
    with pytest.raises(ValueError, match="dst"):
        _C.stream_copy(np.zeros(4, np.float32), np.zeros(5, np.float32))
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="prefetch must be 0"):
            _C.stream_read(np.zeros(4, np.float32), prefetch=bad)


def test_floor_is_the_binding_term_and_never_below_any_resource():
    mem = MemoryFloors(read=10.0, write=4.0, copy=12.0)
    assert mem.seconds(100, 0) == 10.0 and mem.bound(100, 0) == "read"
    assert mem.seconds(0, 100) == 25.0 and mem.bound(0, 100) == "write"
    assert mem.seconds(60, 60) == 15.0 and mem.bound(60, 60) == "write"
    assert mem.seconds(100, 20) == 10.0                  # max(10, 5, 10)


def test_measured_floors_are_positive_and_finite():
    mem = measure_memory_floors(1 << 22, repeats=2)
    assert all(np.isfinite(v) and v > 0 for v in (mem.read, mem.write, mem.copy))
    assert mem.read_prefetch in (0, 1, 2, 3) and mem.to_dict()["read_prefetch"] == mem.read_prefetch


def test_a_row_above_its_floor_fails_loudly_naming_it():
    rows = [BenchRow("op_a", "cpu", "[4]", "fp32", 1.0, pct_of_floor=80.0),
            BenchRow("op_b", "cpu", "[8]", "fp32", 1.0, pct_of_floor=126.0),
            BenchRow("op_c", "torch", "[8]", "fp32", 1.0)]
    check_floors("ok", rows[:1] + rows[2:])
    with pytest.raises(FloorExceeded, match=r"op_b/cpu \[8\] fp32: 126%"):
        check_floors("suite", rows)


@pytest.mark.parametrize("suite", sorted(__import__("benchmarks.__main__", fromlist=["SUITES"]).SUITES))
def test_every_suite_imports_and_has_a_run(suite):
    """`python -m benchmarks SUITE` imports each suite by name: a suite importing a helper that moved fails here."""
    import importlib

    from benchmarks.__main__ import SUITES

    assert callable(importlib.import_module(SUITES[suite]).run)


def test_matmul_rate_is_a_positive_finite_rate():
    from benchmarks.floors import measure_matmul_rate

    rate = measure_matmul_rate(16, 32, 24, repeats=2)
    assert np.isfinite(rate) and rate > 0


def test_interleaved_medians_times_every_function_once_per_round():
    from benchmarks.harness import interleaved_medians

    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    out = interleaved_medians(fns, repeats=40, warmup=1)
    assert set(out) == set("abcd") and all(v >= 0 for v in out.values())
    assert calls[:4] == list("abcd")  # the warm-up round, in order
    rounds = [calls[i:i + 4] for i in range(4, len(calls), 4)]
    assert len(rounds) == 40 and all(sorted(r) == list("abcd") for r in rounds)  # each once per round
    # The orders vary: every function follows every other one in some round (a fixed or rotated order gives
    # each function a single predecessor within the rounds).
    follows = {(a, b) for r in rounds for a, b in zip(r, r[1:])}
    assert follows == {(a, b) for a in "abcd" for b in "abcd" if a != b}
    first = list(calls)
    calls.clear()
    interleaved_medians(fns, repeats=40, warmup=1)
    assert calls == first  # seeded: the same orders in every run


def test_before_runs_ahead_of_every_timed_call_outside_the_timing():
    import time

    from benchmarks.harness import interleaved_medians, median_seconds

    calls = []
    slow = lambda: calls.append("before") or time.sleep(0.05)  # noqa: E731
    t = median_seconds(lambda: calls.append("fn"), repeats=3, warmup=1, before=slow)
    assert calls == ["fn"] + ["before", "fn"] * 3 and t < 0.02
    calls.clear()
    out = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=0,
                              before={"a": slow})
    assert out["a"] < 0.02 and len(calls) == 6 and calls.count("before") == 2
    assert all(calls[i + 1] == "a" for i, c in enumerate(calls) if c == "before")  # right ahead of each a


@pytest.mark.skipif(not _C.flush_cache(np.zeros(1, dtype=np.uint8)), reason="flush_cache is x86-64 only")
def test_cache_flusher_covers_every_tensor_and_keeps_the_values():
    # What the flush does to the caches is measured, not tested (benchmarks/harness.py: a 22 MB read after it runs
    # at the DRAM floor): here it must cover the bytes of every tensor given, change none, and refuse views it
    # cannot cover.
    import torch

    from benchmarks.harness import CacheFlusher

    t = torch.arange(3 << 20, dtype=torch.float32)
    bf = torch.ones(5, 7, dtype=torch.bfloat16)
    flush = CacheFlusher([t, None, bf])
    assert flush.nbytes == t.numel() * 4 + bf.numel() * 2
    flush()
    a = t.numpy()
    assert _C.flush_cache(a[1:]) and _C.flush_cache(a[:0])   # unaligned start, empty
    assert torch.equal(t, torch.arange(3 << 20, dtype=torch.float32))
    assert torch.equal(bf, torch.ones(5, 7, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        CacheFlusher([t.reshape(1024, -1).t()])
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.flush_cache(a.reshape(1024, -1).T)


def test_int8_dot_probe_counts_every_step_and_gives_a_rate():
    from benchmarks.floors import measure_int8_dot_rate
    from lazarus_core import _C

    with pytest.raises(ValueError, match="iters"):
        _C.int8_dot_loop(0)
    per_step = _C.int8_dot_loop(1)
    if not _C.cpu_has_avx2():
        assert per_step == 0 and measure_int8_dot_rate(repeats=1) is None
        return
    lanes = 64 if _C.cpu_has_avx512_vnni() else 32   # products per instruction (vpdpbusd zmm; ymm or vpmaddubsw)
    assert per_step > 0 and per_step % (12 * lanes) == 0            # 12 instructions per step and thread
    assert _C.int8_dot_loop(7) == 7 * per_step
    rate = measure_int8_dot_rate(repeats=2, iters=1000)
    assert rate is not None and 0 < rate < float("inf")


def test_interleaved_times_keeps_every_round_in_order_and_medians_agree():
    from benchmarks.harness import interleaved_medians, interleaved_times

    counter = {"a": 0, "b": 0}
    durations = {"a": [0.002, 0.0, 0.004], "b": [0.0, 0.003, 0.0]}

    def make(k):
        def fn():
            import time

            time.sleep(durations[k][counter[k] % 3])
            counter[k] += 1
        return fn

    fns = {k: make(k) for k in "ab"}
    out = interleaved_times(fns, repeats=3, warmup=0)
    assert set(out) == {"a", "b"} and all(len(v) == 3 for v in out.values())
    # Round r of each list is that function's r-th call: the planted per-call durations come back in order.
    assert out["a"][2] > out["a"][0] > out["a"][1] and out["b"][1] > max(out["b"][0], out["b"][2])
    med = interleaved_medians({"a": lambda: None}, repeats=5, warmup=0)
    assert set(med) == {"a"} and med["a"] >= 0


def test_paired_ratio_ci_covers_a_planted_ratio_and_cancels_shared_drift():
    from benchmarks.harness import paired_ratio_ci

    rng = np.random.default_rng(0)
    drift = rng.uniform(1.0, 1.5, 200)              # both series slow down together, round by round
    den = drift * (1 + 0.02 * rng.standard_normal(200))
    num = 0.7 * drift * (1 + 0.02 * rng.standard_normal(200))
    est, low, high = paired_ratio_ci(num.tolist(), den.tolist())
    assert low <= 0.7 <= high and low < est < high and high - low < 0.06
    # Nothing there: the same series gives a ratio of 1 inside a tight interval.
    est, low, high = paired_ratio_ci(den.tolist(), den.tolist())
    assert est == 1.0 and low == 1.0 and high == 1.0
    # A real difference is not hidden: 0.9 is far outside the interval of a planted 0.7.
    assert paired_ratio_ci(num.tolist(), den.tolist())[2] < 0.9


@pytest.mark.parametrize("num, den, match", [([1.0], [1.0, 2.0], "same length"), ([], [], "non-empty"),
                                             ([1.0, 2.0], [1.0, 0.0], "positive")])
def test_paired_ratio_ci_names_the_bad_argument(num, den, match):
    from benchmarks.harness import paired_ratio_ci

    with pytest.raises(ValueError, match=match):
        paired_ratio_ci(num, den)


def test_same_round_floor_is_the_ratio_of_median_floor_time_to_median_op_time():
    from benchmarks.bench_overlay_moe import FLOOR_PROBE_BYTES, _same_round_floor

    assert _same_round_floor(100, None, [1.0]) == {}
    probe = [0.010, 0.012, 0.011, 0.013, 0.010]       # seconds for FLOOR_PROBE_BYTES each round
    moved = FLOOR_PROBE_BYTES // 4                     # a quarter of the probe's bytes
    op = [t / 4 / 0.8 for t in probe]                  # the op at exactly 80 % of each round's floor
    out = _same_round_floor(moved, probe, op)
    assert out["pct_of_same_round_floor"] == pytest.approx(80.0)
    low, high = out["same_round_floor_ci95"]
    assert low == pytest.approx(80.0) and high == pytest.approx(80.0)
    assert out["same_round_read_gb_s"] == pytest.approx(FLOOR_PROBE_BYTES / 0.011 / 1e9)


def test_overlay_floor_charges_integer_macs_at_the_dot_rate_and_refuses_a_missing_rate():
    """T=256 floor: fp32 flops (less the integer kernels' share) over the matmul rate plus the integer
    multiply-adds over the dot rate; a row with integer work but no dot rate is refused by name (a CPU
    without VNNI got a TypeError here before the AVX2 probe existed)."""
    from benchmarks.bench_overlay_moe import _floor

    row = BenchRow("overlay_moe", "cpu", "[256]", "mxfp4", 1.0,
                   extra={"tokens": 256, "bytes": 10, "flops": 1000, "integer_weight_macs": 100, "int8_macs": 200})
    assert _floor(row, read_bw=1.0, flop_rate=8.0, int8_rate=50.0) == pytest.approx(800 / 8.0 + 200 / 50.0)
    with pytest.raises(ValueError, match=r"overlay_moe/cpu \[256\].*no u8 x s8 dot rate"):
        _floor(row, read_bw=1.0, flop_rate=8.0, int8_rate=None)
    row.extra["int8_macs"] = 0
    assert _floor(row, read_bw=1.0, flop_rate=8.0, int8_rate=None) == pytest.approx(800 / 8.0)


def test_same_round_floor_fails_only_an_overlay_row_faster_than_the_probe_beyond_the_spread():
    """An op whose whole 95 % interval lies above the same-round floor is a benchmark bug and fails by name; a
    median above 100 % whose interval reaches below it is drift between moments, and rows without a probe or of
    other ops are not judged here."""
    from benchmarks.bench_overlay_moe import check_same_round_floor

    def row(dtype, pct, ci, op="overlay_moe_forward"):
        extra = {} if pct is None else {"pct_of_same_round_floor": pct, "same_round_floor_ci95": ci}
        return BenchRow(op, "cpu", "[1]", dtype, 1.0, extra=extra)

    check_same_round_floor([row("a", 102.0, [97.0, 106.0]), row("b", None, None),
                            row("c", 130.0, [120.0, 140.0], op="bare read (same bytes)")])
    with pytest.raises(FloorExceeded, match=r"fp32 twin 108% \(95% CI 103-112%\)"):
        check_same_round_floor([row("ok", 60.0, [55.0, 65.0]), row("fp32 twin", 108.0, [103.0, 112.0])])


def test_a_row_beyond_the_same_round_floor_fails_the_run_after_its_table_is_written(tmp_path, capsys):
    """The suite marks the row (the run goes on to its summary) and report_suite prints the table, writes the JSON
    with the row on record, then raises naming it; a run without such a row passes."""
    from benchmarks.bench_overlay_moe import mark_same_round_floor
    from benchmarks.harness import report_suite

    def row(dtype, pct, ci):
        return BenchRow("overlay_moe_forward", "cpu", "[1]", dtype, 1.0,
                        extra={"pct_of_same_round_floor": pct, "same_round_floor_ci95": ci})

    fine = [row("stored", 80.0, [78.0, 82.0]), row("drift", 101.0, [98.0, 104.0])]
    mark_same_round_floor(fine)
    report_suite("ok", {}, fine, {}, tmp_path)
    rows = fine + [row("fp32 twin", 119.0, [118.5, 121.0])]
    mark_same_round_floor(rows)
    assert [r.dtype for r in rows if r.extra.get("floor_exceeded")] == ["fp32 twin"]
    with pytest.raises(FloorExceeded, match=r"1 row\(s\).*fp32 twin 119% \(95% CI 118-121%\) of the read floor "
                                            r"probed in the same rounds"):
        report_suite("overlay_moe", {}, rows, {}, tmp_path)
    assert "fp32 twin" in capsys.readouterr().out
    assert "floor_exceeded" in (tmp_path / "overlay_moe.json").read_text()
