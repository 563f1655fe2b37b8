"""Reused traces: --verify catches a corrupt shard (one line naming it), and the JSON names the trace's model."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

TEXTS = [("math", "the sum of two and three is five, and the product of the two is six"),
         ("code", "def add(a, b): return a + b  # the function adds the two numbers"),
         ("language", "the cat sat on the mat while the dog slept by the door of the house"),
         ("reasoning", "if the ground is wet then it rained, so the grass grows and the river rises"),
         ("math", "the square of four is sixteen and the root of nine is three"),
         ("language", "she read the letter twice before she put it back in the drawer")]

# Every action that reads a trace, with the options that keep it quick on a small one.
ACTIONS = {
    "analyze": [], "weights": [], "heatmap": [], "trace": ["--doc", "1"],
    "full-taxonomy": [], "domain-test": ["--permutations", "0"],
    "token-routing": ["--token", "the"], "context-test": ["--token", "the"],
    "expert-profile": ["--expert", "0", "--no-loss"],
    "router-entropy": ["--n-boot", "50"], "router-distributions": ["--n-boot", "50"],
    "router-metrics": ["--n-boot", "50", "--permutations", "2"],
    "expert-similarity": ["--no-floor", "--splits", "4"], "expert-projection": ["--permutations", "2"],
}


@pytest.fixture(scope="module")
def trace_dirs(native_model, tmp_path_factory):
    """A labelled demo:native trace with logits and activations, and a copy with one bit flipped in a shard."""
    from lazarus_core.cli.main import main

    root = tmp_path_factory.mktemp("integrity")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "category": c}) + "\n" for c, t in TEXTS))
    good = root / "good"
    code = main(["capture", "-m", native_model, "--jsonl", str(corpus), "--label-field", "category", "-o", str(good),
                 "--logits", "--hidden-states", "--all-experts", "--sample-tokens", "48", "--no-progress", "--json"])
    assert code == 0
    bad = root / "bad"
    shutil.copytree(good, bad)
    meta = json.loads((bad / "trace.json").read_text())
    shard = bad / meta["shards"][0]["file"]
    flip_weight_bit(shard)
    return good, bad, shard.name, meta["model"]


def flip_weight_bit(path: Path) -> None:
    """Flip the lowest mantissa bit of the first routing weight in a safetensors shard (the file stays loadable)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    key = next(k for k in sorted(header) if k.endswith("topk_weights"))
    begin = header[key]["data_offsets"][0]
    data[8 + n + begin] ^= 1
    path.write_bytes(bytes(data))


def test_every_action_that_reads_a_trace_offers_verify():
    from lazarus_core.experiment.runner import _action_parsers, _options

    parsers = _action_parsers()
    with_trace = {name for name, p in parsers.items() if "--trace" in _options(p)}
    assert set(ACTIONS) <= with_trace
    assert [name for name in sorted(with_trace) if "--verify" not in _options(parsers[name])] == []


@pytest.mark.parametrize("action", list(ACTIONS))
def test_verify_names_the_corrupt_shard(action, trace_dirs, run_cli):
    good, bad, shard, _ = trace_dirs
    code, payload, err = run_cli(action, "--trace", str(bad), "--verify", *ACTIONS[action])
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and payload is None, err
    assert len(lines) == 1 and lines[0].startswith("lazarus: error:") and str(bad / shard) in lines[0] and "sha256" in lines[0]
    assert "Traceback" not in err and "verify=" not in err


@pytest.mark.parametrize("action", list(ACTIONS))
def test_without_verify_the_action_runs_and_reports_the_traces_model(action, trace_dirs, run_cli):
    good, bad, _, model = trace_dirs
    code, payload, err = run_cli(action, "--trace", str(bad), *ACTIONS[action])
    assert code == 0, err
    assert payload["action"] == action and payload["model"] == model == "demo:native"


def test_a_sound_trace_passes_verify(trace_dirs, run_cli):
    good, _, _, model = trace_dirs
    code, payload, err = run_cli("analyze", "--trace", str(good), "--verify")
    assert code == 0, err
    assert payload["model"] == model
    tokenizer = json.loads((good / "trace.json").read_text()).get("tokenizer")
    assert tokenizer != model                     # the capture recorded a path: the report still names the model


def test_compare_trace_is_verified_too(trace_dirs, run_cli):
    good, bad, shard, _ = trace_dirs
    code, _, err = run_cli("router-metrics", "--trace", str(good), "--compare-trace", str(bad), "--verify",
                           *ACTIONS["router-metrics"])
    assert code == 2 and str(bad / shard) in err
