"""Trigram-analysis speed: 1M-token synthetic trace (16 layers x 64 experts, k=8) and `explore` latency on demo:native."""

from __future__ import annotations

import argparse
import io
import time

import numpy as np

from benchmarks.floors import measure_memory_floors
from benchmarks.harness import BenchRow, median_seconds

N_TOKENS, N_LAYERS, N_EXPERTS, TOP_K = 1_000_000, 16, 64, 8


def synthetic_trace(n: int = N_TOKENS, layers: int = N_LAYERS, experts: int = N_EXPERTS, k: int = TOP_K, seed: int = 0):
    """Zipf-distributed token types, 512-token sequences, k distinct experts per token (int32, as in a trace)."""
    from lazarus_core.tokens import SEMANTIC_TYPES, TYPE_ID

    rng = np.random.default_rng(seed)
    codes = np.array([TYPE_ID[t] for t in SEMANTIC_TYPES], dtype=np.int16)
    p = 1.0 / np.arange(1, len(codes) + 1)
    types = rng.choice(codes, size=n, p=p / p.sum())
    positions = (np.arange(n) % 512).astype(np.int32)
    offsets = np.array([0, 1, 3, 7, 12, 20, 30, 45][:k])
    ids = {l: ((rng.integers(0, experts, n)[:, None] + offsets[None, :]) % experts).astype(np.int32) for l in range(layers)}
    return types, positions, ids


def _naive_counts(trigrams: np.ndarray, ids: np.ndarray) -> dict:
    """The reference toolkit's way: a Python dict of counters, token by token."""
    counts: dict = {}
    for t, row in zip(trigrams.tolist(), ids.tolist()):
        for e in row:
            d = counts.setdefault(e, {})
            d[t] = d.get(t, 0) + 1
    return counts


def _explore_rows(repeats: int) -> list[BenchRow]:
    from lazarus_core.models.builtin import resolve_builtin

    if resolve_builtin("demo:native") is None:
        return []
    from rich.console import Console

    from lazarus_core.cli.routing_common import Session
    from lazarus_core.cli.routing_explore import Explorer
    from lazarus_core.trigram.prompts import CATEGORIES, category_prompts

    args = argparse.Namespace(model="demo:native", revision=None, device="cpu", trust_remote_code=False, lexicon=[],
                              lexicon_replace=False, view="semantic", pos_tagger="none")
    t0 = time.perf_counter()
    session = Session(args).load()
    load_s = time.perf_counter() - t0
    explorer = Explorer(session, sorted(session.info.layers)[len(session.info.layers) // 2])
    explorer.con = Console(file=io.StringIO(), width=120)
    prompts = [p for c in CATEGORIES for p in category_prompts(c, 3, seed=7)]
    it = iter(prompts * (repeats + 10))
    t = median_seconds(lambda: explorer.analyse(next(it)), repeats=max(repeats, 20), warmup=3)
    n_tok = np.mean([len(session.encode(p)) for p in prompts])
    rows = [BenchRow("explore: new prompt (route + classify + render)", "cpu", f"demo:native, ~{n_tok:.0f} tokens", "fp32",
                     t * 1e3, extra={"model_load_s": round(load_s, 2)})]
    # token classification throughput (what labelling a real trace costs), demo corpus prompts
    from lazarus_core.tokens import PieceDecoder
    from lazarus_core.trigram.prompts import taxonomy_corpus

    docs = [session.encode(p) for p in taxonomy_corpus(list(CATEGORIES), 40, seed=3)[0]]
    decoder = PieceDecoder(session.tokenizer)
    n_cls = sum(map(len, docs))
    t = median_seconds(lambda: [decoder.classify_ids(session.classifier, d) for d in docs], repeats=3, warmup=1)
    rows.append(BenchRow("token classification (both views)", "python", f"{n_cls:,} tokens, {len(docs)} docs", "-",
                         t * 1e3, extra={"tokens_per_s": round(n_cls / t)}))
    return rows


def run(repeats: int = 3) -> tuple[list[BenchRow], dict]:
    """Rows: specialisation (binomial null) over the 1M-token trace, its pieces, and explore's latency."""
    from lazarus_core.trigram.domains import domain_test
    from lazarus_core.trigram.labels import trigram_ids
    from lazarus_core.trigram.specialisation import trigram_specialisation
    from lazarus_core.trigram.usage import layer_usage

    types, positions, ids = synthetic_trace()
    tri = trigram_ids(types, positions)
    repeats = max(1, min(repeats, 3))
    mem = measure_memory_floors(1 << 28)  # the op streams the expert ids: a read floor
    rows = []
    ids_bytes = sum(a.nbytes for a in ids.values())
    shape = f"{N_TOKENS:,} tok x {N_LAYERS} layers x {N_EXPERTS} E, k={TOP_K}"

    t = median_seconds(lambda: trigram_ids(types, positions), repeats=repeats, warmup=1)
    rows.append(BenchRow("trigram ids", "numpy", f"{N_TOKENS:,} tok", "int16->int32", t * 1e3))

    report_holder = {}

    def spec():
        report_holder["r"] = trigram_specialisation(tri, ids, N_EXPERTS)

    t = median_seconds(spec, repeats=repeats, warmup=1)
    gbs = ids_bytes / t / 1e9
    # same-run reference: the dict-of-counters loop on 1 layer x 100k tokens, vs the vectorised path on that slice
    sub = 100_000
    t_naive = median_seconds(lambda: _naive_counts(tri[:sub], ids[0][:sub]), repeats=1, warmup=0)
    t_vec = median_seconds(lambda: trigram_specialisation(tri[:sub], {0: ids[0][:sub]}, N_EXPERTS), repeats=3, warmup=1)
    rows.append(BenchRow("trigram specialisation (binomial null, BH)", "numpy", shape, "int32", t * 1e3, gbs,
                         100 * mem.seconds(ids_bytes) / t, ratio_to_reference=None,
                         extra={"tokens_per_s": round(N_TOKENS * N_LAYERS / t),
                                "num_trigrams": report_holder["r"].num_trigrams}))
    rows.append(BenchRow("  naive dict counting (counts only)", "python", f"{sub:,} tok x 1 layer", "int32",
                         t_naive * 1e3, ratio_to_reference=1.0))
    rows.append(BenchRow("  vectorised (full analysis)", "numpy", f"{sub:,} tok x 1 layer", "int32", t_vec * 1e3,
                         ratio_to_reference=t_naive / t_vec))

    doc_ids = (np.arange(N_TOKENS) // 1000).astype(np.int32)
    labels = {d: ("math", "code", "language", "reasoning")[d % 4] for d in range(N_TOKENS // 1000)}
    t = median_seconds(lambda: [domain_test(ids[l], doc_ids, labels, N_EXPERTS, layer=l, permutations=200)
                                for l in ids], repeats=1, warmup=0)
    rows.append(BenchRow("domain test (chi2, V, 200 doc permutations)", "numpy", shape + ", 1000 docs", "int32", t * 1e3))
    t = median_seconds(lambda: [layer_usage(ids[l], N_EXPERTS, layer=l) for l in ids], repeats=1, warmup=0)
    rows.append(BenchRow("usage + co-activation", "numpy", shape, "int32", t * 1e3, ids_bytes / t / 1e9))
    rows += _explore_rows(repeats)
    return rows, mem.to_dict()
