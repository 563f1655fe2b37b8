"""The trace on disk: shards, reload, per-layer and per-document slicing, resume, and damaged traces."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from lazarus_core.cli.main import main
from lazarus_core.routing.capture import capture_routing
from lazarus_core.routing.corpus import corpus_from_prompts
from lazarus_core.routing.trace_format import TraceError
from lazarus_core.routing.trace_reader import load_trace
from lazarus_core.routing.trace_writer import TraceWriter
from tests.routing.tiny_models import save_tiny_checkpoint, tiny_model, tiny_tokenizer

TEXTS = [" ".join(["the water was long and people said no"] * 3), "it is what it is", "one two three four",
         "people made this for their own time", "a word"]


@pytest.fixture(scope="module")
def olmoe():
    return tiny_model("olmoe"), tiny_tokenizer()


def _capture(model_tok, out, **kw):
    model, tok = model_tok
    kw = {"seq_len": 10, "batch_size": 2, "shard_tokens": 16, "logits": True, "progress": False, **kw}
    return capture_routing(model, tok, corpus_from_prompts(TEXTS), out, **kw)


def test_sharded_trace_reloads_and_slices(olmoe, tmp_path):
    result = _capture(olmoe, tmp_path / "t")
    trace = load_trace(tmp_path / "t", verify=True)
    meta = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert meta["complete"] and meta["format"] == "lazarus-routing-trace" and meta["family"] == "olmoe"
    assert trace.num_shards == result.num_shards > 2
    assert [s["file"] for s in meta["shards"]] == [f"trace-{i:05d}.safetensors" for i in range(trace.num_shards)]
    assert meta["weight_convention"]["renormalize"] is False and meta["top_k"] == 3 and meta["num_experts"] == 8
    tok = olmoe[1]
    assert trace.token_ids.tolist() == [i for t in TEXTS for i in tok(t)["input_ids"]]
    assert trace.document_ids().tolist() == list(range(len(TEXTS)))
    full = trace.layer(1)
    assert full.topk_ids.shape == (trace.num_tokens, 3) and full.topk_ids.dtype == np.int32
    assert full.topk_weights.dtype == np.float32 and full.logits.dtype == np.float16
    assert full.logits.shape == (trace.num_tokens, 8)
    starts = np.flatnonzero(np.r_[True, np.diff(trace.doc_ids) != 0])
    for doc, start in enumerate(starts):           # a document spanning several shards comes back whole
        span = trace.document(doc)
        n = len(tok(TEXTS[doc])["input_ids"])
        assert len(span) == n and (span.doc_ids == doc).all()
        assert np.array_equal(span.layer(0).topk_ids, trace.layer(0).topk_ids[start:start + n])
    shard = next(trace.shards())
    assert isinstance(shard.layer(0).topk_ids, np.memmap)       # memory-mapped, not loaded
    with pytest.raises(ValueError, match="document 9 is not in the trace"):
        trace.document(9)


def test_interrupted_capture_resumes_to_the_same_trace(olmoe, tmp_path, monkeypatch):
    _capture(olmoe, tmp_path / "ref")
    real_flush, calls = TraceWriter.flush, {"n": 0}

    def crashing_flush(self):
        calls["n"] += 1
        if calls["n"] == 3:
            (self.out_dir / ".trace-00002.safetensors.x.tmp").write_bytes(b"half")   # a half-written temp file
            raise KeyboardInterrupt
        real_flush(self)

    monkeypatch.setattr(TraceWriter, "flush", crashing_flush)
    with pytest.raises(KeyboardInterrupt):
        _capture(olmoe, tmp_path / "t")
    monkeypatch.setattr(TraceWriter, "flush", real_flush)
    with pytest.raises(TraceError, match="did not finish"):
        load_trace(tmp_path / "t")
    partial = load_trace(tmp_path / "t", allow_incomplete=True)
    assert partial.num_shards == 2
    with pytest.raises(TraceError, match="already exists"):
        _capture(olmoe, tmp_path / "t")
    resumed = _capture(olmoe, tmp_path / "t", resume=True)
    assert resumed.resumed and not list((tmp_path / "t").glob(".*tmp"))
    ref, got = load_trace(tmp_path / "ref"), load_trace(tmp_path / "t")
    assert got.num_tokens == ref.num_tokens and got.meta["num_documents"] == ref.meta["num_documents"]
    for name in ("token_ids", "doc_ids", "positions"):
        assert np.array_equal(getattr(got, name), getattr(ref, name))
    for l in ref.layers:
        assert np.array_equal(got.layer(l).topk_ids, ref.layer(l).topk_ids)
        np.testing.assert_allclose(got.layer(l).topk_weights, ref.layer(l).topk_weights, rtol=1e-6)
    with pytest.raises(TraceError, match="complete trace"):
        _capture(olmoe, tmp_path / "t", resume=True)


def test_resume_with_another_corpus_is_refused(olmoe, tmp_path):
    model, tok = olmoe
    (tmp_path / "t").mkdir()
    _capture(olmoe, tmp_path / "t", max_tokens=5)
    meta_path = tmp_path / "t" / "trace.json"
    meta = json.loads(meta_path.read_text())
    meta["complete"] = False
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TraceError, match="cannot resume .*'corpus'"):
        capture_routing(model, tok, corpus_from_prompts(["other text"]), tmp_path / "t", max_tokens=5,
                        seq_len=10, logits=True, shard_tokens=16, resume=True, progress=False)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage_header", "huge_header", "bitflip", "no_meta"])
def test_damaged_trace_is_a_clear_error(olmoe, tmp_path, damage):
    _capture(olmoe, tmp_path / "t")
    shard = tmp_path / "t" / "trace-00001.safetensors"
    data = shard.read_bytes()
    if damage == "missing":
        shard.unlink()
        match = "trace-00001.safetensors listed in trace.json is missing"
    elif damage == "truncated":
        shard.write_bytes(data[:-7])
        match = "trace-00001.safetensors is corrupt or truncated"
    elif damage == "garbage_header":
        shard.write_bytes(data[:8] + b"\xff" * (len(data) - 8))
        match = "trace-00001.safetensors is corrupt: unreadable header"
    elif damage == "huge_header":
        shard.write_bytes(struct.pack("<Q", 2**62) + data[8:])
        match = "trace-00001.safetensors is corrupt: header length"
    elif damage == "bitflip":
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        match = "trace-00001.safetensors is corrupt: sha256"
    else:
        (tmp_path / "t" / "trace.json").unlink()
        match = "trace.json not found"
    with pytest.raises(TraceError, match=match):
        load_trace(tmp_path / "t", verify=True)


def test_cli_capture_end_to_end(tmp_path, capsys):
    ckpt = save_tiny_checkpoint("qwen2_moe", tmp_path / "ckpt")
    (tmp_path / "a.txt").write_text(TEXTS[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in TEXTS) + "\n")
    rc = main(["capture", "-m", str(ckpt), "--text", str(tmp_path / "a.txt"), "-o", str(tmp_path / "t1"),
               "--logits", "--layers", "1", "--seq-len", "8", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == [1] and out["num_documents"] == 1
    trace = load_trace(tmp_path / "t1")
    assert trace.layers == [1] and trace.has_logits and trace.meta["model"] == str(ckpt)
    rc = main(["capture", "-m", str(ckpt), "--jsonl", str(tmp_path / "b.jsonl"), "--field", "body",
               "-o", str(tmp_path / "t2"), "--max-tokens", "20", "--batch-size", "2", "--no-progress"])
    assert rc == 0 and load_trace(tmp_path / "t2").num_tokens == 20
    assert main(["capture", "-m", str(ckpt), "-p", "the water", "-o", str(tmp_path / "t3"), "--json"]) == 0


@pytest.mark.parametrize("argv_tail, message", [
    (["--layers", "7"], "layer(s) [7] are not MoE layers"),
    (["--layers", "x"], "--layers expects integers"),
    (["--text", "EMPTY"], "is empty: nothing to capture"),
    (["--jsonl", "NOFIELD", "--field", "body"], "has no field 'body'"),
])
def test_cli_bad_input(tmp_path, capsys, argv_tail, message):
    ckpt = save_tiny_checkpoint("mixtral", tmp_path / "ckpt")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "nofield.jsonl").write_text('{"text": "hi"}\n')
    tail = [a.replace("EMPTY", str(tmp_path / "empty.txt")).replace("NOFIELD", str(tmp_path / "nofield.jsonl"))
            for a in argv_tail]
    source = [] if any(a in ("--text", "--jsonl") for a in tail) else ["-p", "the water"]
    assert main(["capture", "-m", str(ckpt), *source, "-o", str(tmp_path / "t"), *tail]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_model_directory(tmp_path, capsys):
    assert main(["capture", "-m", str(tmp_path / "nope"), "-p", "hi", "-o", str(tmp_path / "t")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_cli_dense_model_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=96)).save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    assert main(["capture", "-m", str(tmp_path / "dense"), "-p", "the water", "-o", str(tmp_path / "t")]) == 2
    assert "has no MoE layers" in capsys.readouterr().err


def test_capture_under_top_k_intervention_records_the_k_used(olmoe, tmp_path):
    from lazarus_core.routing.interventions import set_top_k

    with set_top_k(olmoe[0], 5):
        _capture(olmoe, tmp_path / "t", max_tokens=12)
    trace = load_trace(tmp_path / "t")
    assert trace.top_k == 5 and trace.meta["model_top_k"] == 3 and trace.layer(0).topk_ids.shape == (12, 5)
