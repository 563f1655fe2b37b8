"""Router entropy / distributions / metrics speed on a 1M-token x 16-layer x 64-expert synthetic trace (k = 8),
entropy from fp16 logits as GB/s against the read bandwidth measured in the same run.

``python -m benchmarks.bench_router_metrics --entropy-only`` times only the entropy rows (seconds, not minutes).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from benchmarks.floors import measure_memory_floors
from benchmarks.harness import BenchRow, median_seconds

N_TOKENS, N_LAYERS, N_EXPERTS, TOP_K, DOC_TOKENS, VOCAB = 1_000_000, 16, 64, 8, 1000, 50_000


def synthetic_layers(n: int = N_TOKENS, experts: int = N_EXPERTS, k: int = TOP_K, seed: int = 0):
    """fp16 logits [n, E] (N(0, 2^2) plus a per-expert offset), their top-k ids and softmax weights, Zipf token ids.

    One logits array stands for every layer (128 MB: far larger than the caches, so re-reading it costs
    what reading a fresh layer would); each layer's ids are the top-k rotated by the layer index.
    """
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, experts), dtype=np.float32) * 2 + rng.standard_normal(experts, dtype=np.float32))
    logits = logits.astype(np.float16)
    ids = np.empty((n, k), dtype=np.int32)
    weights = np.empty((n, k), dtype=np.float32)
    x = torch.from_numpy(logits)
    for start in range(0, n, 1 << 16):
        p = torch.softmax(x[start:start + (1 << 16)].float(), dim=1)
        w, i = torch.topk(p, k, dim=1)
        ids[start:start + len(i)], weights[start:start + len(i)] = i.numpy(), w.numpy()
    token_ids = (rng.zipf(1.2, n) % VOCAB).astype(np.int32)
    doc_ids = (np.arange(n) // DOC_TOKENS).astype(np.int32)
    return logits, ids, weights, token_ids, doc_ids


def _reference_entropy(logits: np.ndarray) -> np.ndarray:
    """The plain way: float64 copy of the whole array, softmax, -sum p log p (the readable reference)."""
    x = logits.astype(np.float64)
    x -= x.max(1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(1, keepdims=True)
    return -(p * np.log(np.maximum(p, 1e-300))).sum(1)


def _progress(message: str) -> None:
    print(f"[router_metrics {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(repeats: int = 3, *, entropy_only: bool = False) -> tuple[list[BenchRow], dict]:
    """Rows: the fused entropy op against its torch path (GB/s, % of read bandwidth), its pieces, and (unless
    ``entropy_only``) every analysis over 16 layers."""
    from lazarus_core.analysis.router_distributions import layer_distributions
    from lazarus_core.analysis.router_entropy import DocumentBootstrap, document_index, layer_entropy
    from lazarus_core.analysis.router_metrics import (domain_specialisation, olmoe_coactivation,
                                                      router_saturation, selection_frequency, token_overlap,
                                                      vocabulary_specialisation)
    from lazarus_core.ops import router_entropy_rows

    repeats = max(1, min(repeats, 5))
    load_before = os.getloadavg()[0]
    _progress("building the synthetic trace")
    logits, ids, weights, token_ids, doc_ids = synthetic_layers()
    layer_ids = {l: ((ids + l) % N_EXPERTS).astype(np.int32) for l in range(N_LAYERS)}
    mem = measure_memory_floors()
    read_bw, copy_bw = mem.read, mem.copy
    nbytes = logits.nbytes
    one = f"{N_TOKENS:,} tok x {N_EXPERTS} E"
    full = f"{N_TOKENS:,} tok x {N_LAYERS} layers x {N_EXPERTS} E, k={TOP_K}"
    rows = []
    x = torch.from_numpy(logits)

    # correctness first: the fused op and the torch path against the float64 reference on a slice
    sub = 100_000
    ref_sub = _reference_entropy(logits[:sub])
    max_err = {}
    for backend in ("cpu", "torch"):
        got, _ = router_entropy_rows(x[:sub], backend=backend)
        max_err[backend] = float(np.abs(got.numpy() - ref_sub).max())
        assert max_err[backend] < 1e-5, f"{backend} entropy disagrees with the float64 reference by {max_err[backend]}"

    _progress("entropy kernel")
    t_ref = median_seconds(lambda: _reference_entropy(logits), repeats=1, warmup=0)

    def entropy_row(label, backend, t, ratio=None, **extra):
        gbs = nbytes / t / 1e9
        return BenchRow(label, backend, one, "fp16", t * 1e3, gbs, 100 * gbs * 1e9 / read_bw, ratio_to_reference=ratio,
                        extra={"tokens_per_s": round(N_TOKENS / t), **extra})

    for scoring in ("softmax", "sigmoid"):
        t_torch = median_seconds(lambda: router_entropy_rows(x, scoring=scoring, backend="torch"), repeats=repeats,
                                 warmup=1)
        t_cpu = median_seconds(lambda: router_entropy_rows(x, scoring=scoring, backend="cpu"), repeats=repeats,
                               warmup=1)
        rows.append(entropy_row(f"router_entropy_rows ({scoring}), 1 layer", "cpu (fused, AVX2)", t_cpu,
                                t_ref / t_cpu if scoring == "softmax" else None,
                                max_abs_err_vs_float64=max_err["cpu"], x_torch_path=round(t_torch / t_cpu, 2)))
        rows.append(entropy_row(f"router_entropy_rows ({scoring}), 1 layer", "torch chunked fp32", t_torch,
                                t_ref / t_torch if scoring == "softmax" else None,
                                max_abs_err_vs_float64=max_err["torch"]))
    threads = torch.get_num_threads()
    if threads > 1:   # one thread: what the kernel gets on a machine busy with other work
        torch.set_num_threads(1)
        try:
            t = median_seconds(lambda: router_entropy_rows(x, backend="torch"), repeats=repeats, warmup=1)
        finally:
            torch.set_num_threads(threads)
        rows.append(entropy_row("router_entropy_rows (softmax), 1 layer, 1 torch thread", "torch chunked fp32", t,
                                t_ref / t))
    rows.append(BenchRow("  reference: float64 numpy, whole array", "numpy", one, "fp16->fp64", t_ref * 1e3,
                         nbytes / t_ref / 1e9, 100 * nbytes / t_ref / read_bw, ratio_to_reference=1.0))
    # what bounds the torch path: the fp16 -> fp32 conversion and one exp2 over the same elements
    buf = torch.empty((8192, N_EXPERTS), dtype=torch.float32)
    ebuf = torch.empty_like(buf)

    def convert_only():
        for start in range(0, N_TOKENS, 8192):
            chunk = x[start:start + 8192]
            buf[:len(chunk)].copy_(chunk)

    def convert_exp():
        for start in range(0, N_TOKENS, 8192):
            chunk = x[start:start + 8192]
            buf[:len(chunk)].copy_(chunk)
            torch.exp2(buf[:len(chunk)], out=ebuf[:len(chunk)])

    for name, fn in (("  piece: fp16->fp32 chunk copy only", convert_only),
                     ("  piece: copy + one exp2 (the torch path's transcendental)", convert_exp)):
        t = median_seconds(fn, repeats=repeats, warmup=1)
        rows.append(BenchRow(name, "torch", one, "fp16", t * 1e3, nbytes / t / 1e9, 100 * nbytes / t / read_bw))
    floors = {"read_GB_per_s": read_bw / 1e9, "copy_GB_per_s": copy_bw / 1e9, "torch_threads": torch.get_num_threads(),
              "load_avg_before": load_before}
    if entropy_only:
        return rows, {**floors, "load_avg_after": os.getloadavg()[0]}

    boot = DocumentBootstrap(*document_index(doc_ids, N_TOKENS), n_boot=1000)
    heavy = 1          # each 16-layer pass is seconds: timed once
    _progress("router_entropy, 16 layers")
    t = median_seconds(lambda: [layer_entropy(logits, weights, doc_ids, layer=l) for l in range(N_LAYERS)],
                       repeats=heavy, warmup=0)
    rows.append(BenchRow("router_entropy: all 16 layers (+ top-k, CI, quantiles, histograms)", "torch+numpy", full,
                         "fp16", t * 1e3, N_LAYERS * nbytes / t / 1e9, 100 * N_LAYERS * nbytes / t / read_bw))
    _progress("router_distributions, 16 layers")
    t = median_seconds(lambda: [layer_distributions(logits, layer_ids[l], weights, doc_ids, layer=l)
                                for l in range(N_LAYERS)], repeats=heavy, warmup=0)
    rows.append(BenchRow("router_distributions: all 16 layers (4 histograms, 65,536-token sample)", "torch+numpy",
                         full, "fp16", t * 1e3, N_LAYERS * nbytes / t / 1e9, 100 * N_LAYERS * nbytes / t / read_bw))

    labels = [("math", "code", "prose", "dialogue")[d % 4] for d in range(N_TOKENS // DOC_TOKENS)]
    compare = {l: layer_ids[(l + 1) % N_LAYERS] for l in range(N_LAYERS)}
    pieces = {
        "selection frequency (+ doc CI)": lambda l: selection_frequency(layer_ids[l], N_EXPERTS, boot),
        "vocabulary specialisation (10 perms)": lambda l: vocabulary_specialisation(token_ids, layer_ids[l][:, 0],
                                                                                    N_EXPERTS),
        "token overlap / Jaccard (10 perms)": lambda l: token_overlap(token_ids, layer_ids[l], N_EXPERTS),
        "OLMoE co-activation (+ both baselines)": lambda l: olmoe_coactivation(layer_ids[l], N_EXPERTS),
        "domain specialisation (4 domains, 200 perms)": lambda l: domain_specialisation(layer_ids[l], boot.doc_index,
                                                                                        labels, N_EXPERTS),
        "router saturation vs a second trace": lambda l: router_saturation(layer_ids[l], compare[l], N_EXPERTS, boot),
    }
    ids_bytes = N_LAYERS * layer_ids[0].nbytes
    total = 0.0
    for name, fn in pieces.items():
        _progress(f"router_metrics: {name}, 16 layers")
        t = median_seconds(lambda: [fn(l) for l in range(N_LAYERS)], repeats=heavy, warmup=0)
        rows.append(BenchRow(f"router_metrics: {name}", "numpy", full, "int32", t * 1e3, ids_bytes / t / 1e9,
                             extra={"per_layer_ms": round(t * 1e3 / N_LAYERS, 1)}))
        total += t
    rows.append(BenchRow("router_metrics: all six metrics, all 16 layers (sum)", "numpy", full, "int32", total * 1e3,
                         ids_bytes / total / 1e9))
    # the other work on the machine while this ran (1-minute load average; 2 cores here)
    return rows, {**floors, "load_avg_after": os.getloadavg()[0]}


def main() -> None:
    import argparse
    from pathlib import Path

    from benchmarks.harness import machine_header, report_suite

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_router_metrics", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--entropy-only", action="store_true", help="only the entropy rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for the JSON file")
    args = parser.parse_args()
    header = machine_header()
    rows, floors = run(args.repeats, entropy_only=args.entropy_only)
    report_suite("router_metrics_entropy" if args.entropy_only else "router_metrics", header, rows, floors, args.out)


if __name__ == "__main__":
    main()
