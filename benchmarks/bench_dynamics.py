"""cold-experts (trace-level part) and expert-circuits (length 2 and 3) on a 1M-token x 16-layer x 64-expert synthetic
trace at k = 4 and k = 8; chain counting against the machine's measured bincount rate (ids per second)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import BenchRow, median_seconds

N_TOKENS, N_LAYERS, N_EXPERTS, DOC_TOKENS, VOCAB = 1_000_000, 16, 64, 1000, 50_000
COLD_OFFSET = -6.0          # four experts per layer get this router-logit offset: they are cold
PLANT_LAYERS, PLANT_EXPERTS, PLANT_SHARE = (3, 4), (10, 30), 0.02   # not cold experts there


def synthetic_trace(k: int, seed: int = 0, logits: np.ndarray | None = None):
    """An in-memory Trace: per layer, one top-k routing of noisy logits, its rows permuted (layers independent) and
    its expert labels rotated, with four cold experts per layer and a circuit planted on 2% of tokens.

    Returns (trace, logits fp16 [n, E]); every layer shares the one logits / weights array (what the trace-level
    analyses read costs the same; the logits of layers > 0 do not match their ids, which timing does not see).
    """
    from lazarus_core.routing.trace_reader import LayerTrace, TokenSpan, Trace

    rng = np.random.default_rng(seed)
    if logits is None:
        offsets = rng.standard_normal(N_EXPERTS).astype(np.float32) * 0.3
        offsets[:4] += COLD_OFFSET
        logits = (rng.standard_normal((N_TOKENS, N_EXPERTS), dtype=np.float32) * 2 + offsets).astype(np.float16)
    ids = np.empty((N_TOKENS, k), dtype=np.int32)
    weights = np.empty((N_TOKENS, k), dtype=np.float32)
    x = torch.from_numpy(logits)
    for s in range(0, N_TOKENS, 1 << 16):
        w, i = torch.topk(torch.softmax(x[s:s + (1 << 16)].float(), 1), k, dim=1)
        ids[s:s + len(i)], weights[s:s + len(i)] = i.numpy(), w.numpy()
    layers = {}
    planted = rng.random(N_TOKENS) < PLANT_SHARE
    for l in range(N_LAYERS):
        li = (ids[rng.permutation(N_TOKENS)] + 5 * l) % N_EXPERTS
        if l in PLANT_LAYERS:
            e = PLANT_EXPERTS[PLANT_LAYERS.index(l)]
            rows = li[planted]
            dup = rows == e                                   # keep the k experts of a row distinct
            rows[dup] = np.broadcast_to(rows[:, :1], rows.shape)[dup]
            rows[:, 0] = e
            li[planted] = rows
        layers[l] = LayerTrace(l, li.astype(np.int32), weights, logits)
    token_ids = (rng.zipf(1.2, N_TOKENS) % VOCAB).astype(np.int32)
    doc_ids = (np.arange(N_TOKENS) // DOC_TOKENS).astype(np.int32)
    positions = (np.arange(N_TOKENS) % DOC_TOKENS).astype(np.int32)
    meta = {"moe_layers": list(range(N_LAYERS)), "num_tokens": N_TOKENS, "num_experts": N_EXPERTS, "top_k": k,
            "has_logits": True, "shards": [], "num_documents": N_TOKENS // DOC_TOKENS}
    return Trace(Path("synthetic"), meta, [TokenSpan(token_ids, doc_ids, positions, layers)]), logits


def measure_bincount_rate(n: int = 1 << 26) -> float:
    """Ids per second of one ``bincount`` of random int32 ids into E^3 bins (the bound of triple counting)."""
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, N_EXPERTS ** 3, n).astype(np.int32))
    return n / median_seconds(lambda: torch.bincount(ids, minlength=N_EXPERTS ** 3), repeats=3, warmup=1)


def run(repeats: int = 3) -> tuple[list[BenchRow], dict]:
    """Rows: cold-experts over 16 layers, expert-circuits length 2 and 3 (with the permuted control), and the counts."""
    from lazarus_core.analysis.cold_experts import cold_experts
    from lazarus_core.analysis.expert_circuits import chain_tables, expert_circuits, triple_counts

    heavy = max(1, min(repeats, 2))
    bincount_rate = measure_bincount_rate()
    rows, logits = [], None
    for k in (4, 8):
        start = time.perf_counter()
        trace, logits = synthetic_trace(k, logits=logits)
        build_s = time.perf_counter() - start
        shape = f"{N_TOKENS:,} tok x {N_LAYERS} layers x {N_EXPERTS} E, k={k}"
        ids = [trace.layer(l).topk_ids for l in trace.layers]

        # correctness first: the planted circuit is the top one, the permuted control finds (almost) nothing,
        # and the 4 cold experts of each layer are found
        res = expert_circuits(trace, length=2, top=5)
        want = [[PLANT_LAYERS[0], PLANT_EXPERTS[0]], [PLANT_LAYERS[1], PLANT_EXPERTS[1]]]
        assert res.circuits and res.circuits[0].path == want, res.circuits[:1]
        assert res.significant_permuted <= 2, res.significant_permuted
        cold = cold_experts(trace)
        assert all(len(l.cold_experts) == 4 for l in cold.layers), [len(l.cold_experts) for l in cold.layers]

        t = median_seconds(lambda: cold_experts(trace), repeats=heavy, warmup=0)
        rows.append(BenchRow("cold-experts, trace level: 16 layers (shares, null, triggers, top-logit contexts)",
                             "numpy", shape, "int32+fp16", t * 1e3,
                             extra={"cold_experts": cold.num_cold, "per_layer_ms": round(t * 1e3 / N_LAYERS, 1)}))
        t = median_seconds(lambda: chain_tables(ids, trace.layers, N_EXPERTS, 2), repeats=heavy, warmup=0)
        pair_ids = N_TOKENS * k * k * (N_LAYERS - 1)
        rows.append(BenchRow("  expert-circuits length 2: counts + expectation + p (15 windows)", "torch bincount",
                             shape, "int32", t * 1e3, pct_of_floor=100 * pair_ids / t / bincount_rate,
                             extra={"M_ids_per_s": round(pair_ids / t / 1e6, 1)}))
        t = median_seconds(lambda: expert_circuits(trace, length=2), repeats=heavy, warmup=0)
        rows.append(BenchRow("expert-circuits length 2, with the permuted control", "torch+numpy", shape, "int32",
                             t * 1e3, extra={"tests": res.tests, "significant": res.significant,
                                             "significant_permuted": res.significant_permuted}))
        n_ids = N_TOKENS * k ** 3
        t = median_seconds(lambda: triple_counts(ids[0], ids[1], ids[2], N_EXPERTS), repeats=heavy, warmup=0)
        rows.append(BenchRow("  triple counts, one window", "torch bincount", shape, "int32", t * 1e3,
                             pct_of_floor=100 * n_ids / t / bincount_rate,
                             extra={"M_ids_per_s": round(n_ids / t / 1e6, 1)}))
        res3 = None

        def length3():
            nonlocal res3
            res3 = expert_circuits(trace, length=3)

        t = median_seconds(length3, repeats=1, warmup=0)
        rows.append(BenchRow("expert-circuits length 3, with the permuted control (2 x 14 windows)", "torch+numpy",
                             shape, "int32", t * 1e3, extra={"tests": res3.tests, "significant": res3.significant,
                                                             "significant_permuted": res3.significant_permuted,
                                                             "trace_build_s": round(build_s, 1)}))
        del trace, ids
    return rows, {"bincount_M_ids_per_s": bincount_rate / 1e6, "torch_threads": torch.get_num_threads()}
