"""Distributed capture on 2 gloo processes: one trace in document order equal to a single-process capture,
a failed rank leaves resumable parts, and `torchrun ... lazarus capture` runs the same path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lazarus_core.distributed import RankFailed, World, split_contiguous
from lazarus_core.routing.capture import PARTS_DIR, capture_routing
from lazarus_core.routing.corpus import corpus_from_prompts
from lazarus_core.routing.trace_reader import load_trace
from tests.fixtures.distributed import exit_rank
from tests.routing.tiny_models import save_tiny_checkpoint, tiny_model, tiny_tokenizer

TEXTS = ["the water was long and people said no " * 3, "it is what it is", "one two three four five",
         "people made this for their own time", "a word", "the man had not said what they were for",
         "how many words do you know", "we can go back there"]
CAPTURE = dict(seq_len=10, batch_size=3, logits=True, hidden_states=True, expert_outputs=True, sample_tokens=25,
               activation_dtype="fp32", shard_tokens=16, progress=False)


def _same_trace(a: Path, b: Path) -> None:
    ta, tb = load_trace(a), load_trace(b)
    assert (ta.num_tokens, ta.meta["num_documents"], ta.layers) == (tb.num_tokens, tb.meta["num_documents"], tb.layers)
    for name in ("token_ids", "doc_ids", "positions"):
        np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name))
    for layer in ta.layers:
        la, lb = ta.layer(layer), tb.layer(layer)
        np.testing.assert_array_equal(la.topk_ids, lb.topk_ids)
        np.testing.assert_allclose(la.topk_weights, lb.topk_weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(la.logits.astype(np.float32), lb.logits.astype(np.float32), atol=2e-3)
        aa, ab = ta.activations(layer), tb.activations(layer)
        np.testing.assert_array_equal(aa.sample_index, ab.sample_index)   # the global token sample
        np.testing.assert_allclose(aa.hidden, ab.hidden, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(aa.expert_outputs, ab.expert_outputs, rtol=1e-4, atol=1e-5)


def _worker(rank: int, store: str, out: str, resume: bool, fail_rank: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = tiny_model("olmoe")
        if rank == fail_rank:  # this rank dies after its first shard
            from lazarus_core.routing import trace_writer

            original = trace_writer.TraceWriter.flush

            def flush_then_fail(self):
                original(self)
                if self.meta["shards"]:
                    raise RuntimeError("simulated crash")

            trace_writer.TraceWriter.flush = flush_then_fail
        try:
            capture_routing(model, tiny_tokenizer(), corpus_from_prompts(TEXTS), out, resume=resume,
                            world=World(rank, 2, "gloo"), **CAPTURE)
        except RankFailed as exc:
            Path(out + f".error-{rank}").write_text(str(exc))
    finally:
        torch.distributed.destroy_process_group()
    exit_rank()


def _spawn(tmp: Path, out: Path, *, resume: bool = False, fail_rank: int = -1, run: str = "a") -> None:
    mp.start_processes(_worker, args=(str(tmp / f"store-{run}"), str(out), resume, fail_rank), nprocs=2,
                       start_method="spawn", join=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "trace"
    capture_routing(tiny_model("olmoe"), tiny_tokenizer(), corpus_from_prompts(TEXTS), out, **CAPTURE)
    return out


def test_split_contiguous_balances_tokens_in_order():
    ranges = split_contiguous([5, 1, 1, 1, 5, 1], 2)
    assert ranges == [range(0, 3), range(3, 6)]
    assert split_contiguous([3], 3) == [range(0, 0), range(0, 1), range(1, 1)]
    assert [len(r) for r in split_contiguous([1] * 10, 3)] == [3, 4, 3]


@pytest.mark.slow
def test_two_ranks_write_one_trace_equal_to_one_process(tmp_path, single):
    out = tmp_path / "trace"
    _spawn(tmp_path, out)
    assert not (out / PARTS_DIR).exists()
    _same_trace(out, single)
    meta = json.loads((out / "trace.json").read_text())
    assert meta["distributed"]["world_size"] == 2
    first, second = meta["distributed"]["assignment"]["0"], meta["distributed"]["assignment"]["1"]
    assert first[0] == 0 and second[0] == first[1] + 1 and second[1] == len(TEXTS) - 1
    assert "distributed" not in json.loads((single / "trace.json").read_text())


@pytest.mark.slow
def test_a_dead_rank_leaves_parts_and_a_rerun_resumes(tmp_path, single):
    out = tmp_path / "trace"
    _spawn(tmp_path, out, fail_rank=1, run="a")
    errors = {r: Path(f"{out}.error-{r}").read_text() for r in (0, 1) if Path(f"{out}.error-{r}").exists()}
    assert set(errors) == {0, 1} and all("rank 1: RuntimeError: simulated crash" in e for e in errors.values())
    assert not (out / "trace.json").exists()
    parts = sorted((out / PARTS_DIR).iterdir())
    assert [p.name for p in parts] == ["rank-00000-of-00002", "rank-00001-of-00002"]
    done_before = json.loads((parts[1] / "trace.json").read_text())["progress"]["sequences_done"]
    assert done_before > 0                      # the dead rank kept its first shard
    for r in (0, 1):
        Path(f"{out}.error-{r}").unlink()
    _spawn(tmp_path, out, resume=True, run="b")
    assert not any(Path(f"{out}.error-{r}").exists() for r in (0, 1))
    assert not (out / PARTS_DIR).exists()
    _same_trace(out, single)


@pytest.mark.slow
def test_torchrun_lazarus_capture(tmp_path, single):
    model_dir = save_tiny_checkpoint("olmoe", tmp_path / "model")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    lazarus = shutil.which("lazarus", path=str(Path(sys.executable).parent))
    assert torchrun and lazarus, "torchrun and lazarus are installed with the package's dependencies"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", lazarus, "capture", "-m", str(model_dir),
           "-o", str(tmp_path / "trace"), "--seq-len", "10", "--batch-size", "3", "--logits", "--json",
           "--prompt", *TEXTS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)           # one JSON document: only rank 0 reports
    assert printed["num_tokens"] == load_trace(single).num_tokens
    trace = load_trace(tmp_path / "trace")
    ref = load_trace(single)
    np.testing.assert_array_equal(trace.token_ids, ref.token_ids)
    np.testing.assert_array_equal(trace.layer(trace.layers[0]).topk_ids, ref.layer(ref.layers[0]).topk_ids)
    assert json.loads((tmp_path / "trace" / "trace.json").read_text())["distributed"]["world_size"] == 2
