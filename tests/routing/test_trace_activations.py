"""Trace format version 2: hidden states, selected and all expert outputs, token sampling, bf16, resume, v1 reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lazarus_core.routing.capture import capture_routing
from lazarus_core.routing.corpus import EmptyInputError, corpus_from_dataset, corpus_from_iterable, corpus_from_prompts
from lazarus_core.routing.locate import find_moe_layers
from lazarus_core.routing.trace_format import TraceError, bf16_bits_to_float32
from lazarus_core.routing.trace_reader import load_trace
from lazarus_core.routing.trace_writer import TraceWriter
from tests.routing.tiny_models import tiny_model, tiny_tokenizer

TEXTS = [" ".join(["the water was long and people said no"] * 3), "it is what it is", "one two three four",
         "people made this for their own time", "a word", "the man had not said what they were for"]
ALL = dict(hidden_states=True, expert_outputs=True, all_experts=True)


def _capture(model, out, *, texts=TEXTS, **kw):
    kw.setdefault("sample_tokens", 1000)
    return capture_routing(model, tiny_tokenizer(), corpus_from_prompts(texts), out, seq_len=12, batch_size=2,
                           logits=True, progress=False, **kw)


def _olmoe_expert_reference(experts, hidden: np.ndarray, e: int) -> np.ndarray:
    """OLMoE SwiGLU expert written out from its fused weights: down(silu(gate h) * up h), float64."""
    gate_up = experts.gate_up_proj[e].detach().double().numpy()          # [2I, H], gate rows above up rows
    down = experts.down_proj[e].detach().double().numpy()                # [H, I]
    inter = gate_up.shape[0] // 2
    h = hidden.astype(np.float64)
    gate, up = h @ gate_up[:inter].T, h @ gate_up[inter:].T
    return (gate / (1.0 + np.exp(-gate)) * up) @ down.T


def test_olmoe_activations_match_a_written_out_expert(tmp_path):
    model = tiny_model("olmoe")
    _capture(model, tmp_path / "t", activation_dtype="fp32", **ALL)
    trace = load_trace(tmp_path / "t")
    assert trace.version == 2 and trace.has_hidden and trace.has_expert_outputs and trace.has_all_expert_outputs
    info = find_moe_layers(model)
    for layer in trace.layers:
        acts = trace.activations(layer)
        assert np.array_equal(acts.sample_index, np.arange(trace.num_tokens))        # no sampling: every token
        # the hidden state is the router input: logits = h @ W.T
        w = info.layers[layer].router.weight.detach().numpy()
        np.testing.assert_allclose(acts.hidden @ w.T, trace.layer(layer).logits.astype(np.float32), atol=4e-3)
        experts = info.layers[layer].experts
        for e in range(trace.num_experts):
            np.testing.assert_allclose(acts.all_expert_outputs[:, e], _olmoe_expert_reference(experts, acts.hidden, e),
                                       rtol=1e-4, atol=1e-5)
        ids = trace.layer(layer).topk_ids.astype(np.int64)
        chosen = np.take_along_axis(acts.all_expert_outputs, ids[:, :, None], 1)
        np.testing.assert_allclose(acts.expert_outputs, chosen, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "dbrx"])
def test_weighted_expert_outputs_sum_to_the_experts_module_output(family, tmp_path):
    """sum_j w_j * expert_outputs[:, j] is what the experts module returned (scaling factors live in w)."""
    model = tiny_model(family)
    _capture(model, tmp_path / "t", activation_dtype="fp32", hidden_states=True, expert_outputs=True)
    trace = load_trace(tmp_path / "t")
    info = find_moe_layers(model)
    seen = {}
    handles = [info.layers[l].experts.register_forward_hook(
        lambda m, a, out, l=l: seen.setdefault(l, []).append(out.detach().reshape(-1, out.shape[-1])))
        for l in trace.layers]
    tok = tiny_tokenizer()
    try:
        with torch.inference_mode():
            for text in TEXTS:   # one sequence at a time: rows are the document's tokens in order (seq_len 12)
                ids = tok(text)["input_ids"]
                for start in range(0, len(ids), 12):
                    model.base_model(input_ids=torch.tensor([ids[start:start + 12]]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for layer in trace.layers:
        acts = trace.activations(layer)
        mixed = (acts.expert_outputs * trace.layer(layer).topk_weights[:, :, None]).sum(1)
        np.testing.assert_allclose(mixed, torch.cat(seen[layer]).numpy(), rtol=1e-4, atol=1e-5)


def test_sample_is_seeded_uniform_and_shared_by_layers(tmp_path):
    model = tiny_model("olmoe")
    _capture(model, tmp_path / "a", hidden_states=True, sample_tokens=17, seed=3, shard_tokens=16)
    _capture(model, tmp_path / "b", hidden_states=True, sample_tokens=17, seed=3)
    _capture(model, tmp_path / "c", hidden_states=True, sample_tokens=17, seed=4)
    a, b, c = (load_trace(tmp_path / n) for n in "abc")
    assert a.num_shards > 1
    idx = a.activations(a.layers[0]).sample_index
    assert len(idx) == 17 and np.all(np.diff(idx) > 0) and idx.max() < a.num_tokens
    assert all(np.array_equal(a.activations(l).sample_index, idx) for l in a.layers)
    assert np.array_equal(b.activations(b.layers[0]).sample_index, idx)            # same seed, other sharding
    np.testing.assert_array_equal(a.activations(1).hidden, b.activations(1).hidden)
    assert not np.array_equal(c.activations(c.layers[0]).sample_index, idx)        # another seed
    # documents slice the sample
    doc0 = a.document(0)
    local = doc0.activations(1).sample_index
    assert np.array_equal(local, idx[idx < len(doc0)])


def test_bf16_and_fp16_storage_round_to_the_fp32_values(tmp_path):
    model = tiny_model("olmoe")
    _capture(model, tmp_path / "f32", hidden_states=True, activation_dtype="fp32")
    _capture(model, tmp_path / "bf16", hidden_states=True, activation_dtype="bf16")
    _capture(model, tmp_path / "f16", hidden_states=True, activation_dtype="fp16")
    ref = load_trace(tmp_path / "f32").activations(1).hidden
    got_bf16 = load_trace(tmp_path / "bf16").activations(1).hidden
    assert np.array_equal(got_bf16, torch.from_numpy(ref.copy()).to(torch.bfloat16).float().numpy())
    got_f16 = load_trace(tmp_path / "f16").activations(1).hidden
    assert np.array_equal(got_f16, ref.astype(np.float16).astype(np.float32))
    bits = np.array([0x3F80, 0xC000, 0x0000, 0x8000, 0x7F80], np.uint16)
    assert bf16_bits_to_float32(bits).tolist() == [1.0, -2.0, 0.0, -0.0, float("inf")]


def test_interrupted_capture_with_activations_resumes_to_the_same_trace(tmp_path, monkeypatch):
    model = tiny_model("olmoe")
    kw = dict(sample_tokens=20, seed=1, shard_tokens=16, **ALL)
    _capture(model, tmp_path / "ref", **kw)
    real_flush, calls = TraceWriter.flush, {"n": 0}

    def crashing_flush(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_flush(self)

    monkeypatch.setattr(TraceWriter, "flush", crashing_flush)
    with pytest.raises(KeyboardInterrupt):
        _capture(model, tmp_path / "t", **kw)
    monkeypatch.setattr(TraceWriter, "flush", real_flush)
    with pytest.raises(TraceError, match="cannot resume .*'activations'"):
        _capture(model, tmp_path / "t", resume=True, **dict(kw, sample_tokens=21))
    _capture(model, tmp_path / "t", resume=True, **kw)
    ref, got = load_trace(tmp_path / "ref"), load_trace(tmp_path / "t")
    for l in ref.layers:
        r, g = ref.activations(l), got.activations(l)
        assert np.array_equal(r.sample_index, g.sample_index)
        for name in ("hidden", "expert_outputs", "all_expert_outputs"):
            np.testing.assert_allclose(getattr(g, name), getattr(r, name), rtol=1e-3, atol=1e-4)


def test_activations_bound_the_shard_size(tmp_path):
    plain = TraceWriter(tmp_path / "p", {"top_k": 3, "num_experts": 8, "hidden_size": 4096}, [0, 1], True)
    heavy = TraceWriter(tmp_path / "h", {"top_k": 3, "num_experts": 8, "hidden_size": 4096}, [0, 1], True,
                        activations={"hidden": True, "expert_outputs": True, "all_expert_outputs": False,
                                     "dtype": "fp16", "sample_fraction": 1.0})
    # 2 layers x (1 + 3) x 4096 fp16 values per token: about 64 KiB, so about 2,000 tokens per 128 MiB shard
    assert heavy.shard_tokens < plain.shard_tokens / 50
    assert 1500 < heavy.shard_tokens < 2100


def test_version_1_traces_still_read(tmp_path):
    model = tiny_model("olmoe")
    _capture(model, tmp_path / "t", sample_tokens=None)
    meta_path = tmp_path / "t" / "trace.json"
    meta = json.loads(meta_path.read_text())
    for key in ("activations", "hidden_size"):
        meta.pop(key)
    meta["version"] = 1
    meta_path.write_text(json.dumps(meta))
    trace = load_trace(tmp_path / "t")
    assert trace.version == 1 and not trace.has_hidden and trace.layer(1).topk_ids.shape[1] == 3
    with pytest.raises(ValueError, match="--hidden-states"):
        trace.to_numpy(1, "hidden")
    meta["version"] = 9
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TraceError, match="version 9"):
        load_trace(tmp_path / "t")


def test_missing_or_bad_activation_tensors_are_clear_errors(tmp_path):
    model = tiny_model("olmoe")
    _capture(model, tmp_path / "t", hidden_states=True)
    meta_path = tmp_path / "t" / "trace.json"
    meta = json.loads(meta_path.read_text())
    meta["activations"]["expert_outputs"] = True      # claims a tensor the shards do not hold
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TraceError, match="expert_outputs' is missing"):
        load_trace(tmp_path / "t")
    with pytest.raises(ValueError, match="--all-experts needs --sample-tokens"):
        _capture(model, tmp_path / "u", all_experts=True, sample_tokens=None)
    with pytest.raises(ValueError, match="--activation-dtype"):
        _capture(model, tmp_path / "u", hidden_states=True, activation_dtype="int8")


def test_to_pandas_and_to_numpy(tmp_path):
    pytest.importorskip("pandas")
    model = tiny_model("olmoe")
    _capture(model, tmp_path / "t", hidden_states=True, sample_tokens=9)
    trace = load_trace(tmp_path / "t")
    df = trace.to_pandas(1)
    t, k = trace.num_tokens, trace.top_k
    assert len(df) == t * k and list(df.columns[:7]) == ["token_index", "token_id", "doc_id", "position", "slot",
                                                          "expert", "weight"]
    row = df[(df.token_index == 5) & (df.slot == 1)].iloc[0]
    lt = trace.layer(1)
    assert row.expert == lt.topk_ids[5, 1] and row.token_id == trace.token_ids[5]
    assert row.logit == pytest.approx(float(lt.logits[5, lt.topk_ids[5, 1]]))
    assert np.allclose(df.groupby("token_index").weight.sum().to_numpy(), lt.topk_weights.sum(1))
    assert trace.to_numpy(1, "hidden").shape == (9, 32)
    assert trace.to_numpy(1, "sample_index").shape == (9,)
    with pytest.raises(ValueError, match="--expert-outputs"):
        trace.to_numpy(1, "expert_outputs")
    with pytest.raises(ValueError, match="unknown trace field"):
        trace.to_numpy(1, "attention")


def test_capture_takes_any_iterable_of_texts(tmp_path):
    model = tiny_model("olmoe")
    gen = (t for t in ["", *TEXTS[:3]])
    res = capture_routing(model, tiny_tokenizer(), gen, tmp_path / "t", seq_len=12, progress=False)
    trace = load_trace(tmp_path / "t")
    assert res.num_documents == 3 and trace.meta["corpus"]["skipped_empty"] == 1
    with pytest.raises(TypeError, match="item 1 is int"):
        corpus_from_iterable(["a", 3])
    with pytest.raises(EmptyInputError):
        corpus_from_iterable(["", "  "])
    with pytest.raises(TypeError, match="single string"):
        corpus_from_iterable("one document")


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_corpus_from_a_local_dataset_file(tmp_path, suffix):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("datasets")
    frame = pd.DataFrame({"text": ["alpha doc", "", "gamma doc"], "domain": ["a", "b", "c"]})
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    corpus, labels = corpus_from_dataset(str(path), "text", label_field="domain")
    assert corpus.texts == ["alpha doc", "gamma doc"] and labels == ["a", "c"] and corpus.skipped_empty == 1
    with pytest.raises(ValueError, match="no field 'body'.*text, domain"):
        corpus_from_dataset(str(path), "body")
    with pytest.raises(ValueError, match="--split validation"):
        corpus_from_dataset(str(path), "text", split="validation")


def test_dataset_without_the_datasets_package_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"lazarus-core\[datasets\]"):
        corpus_from_dataset(str(tmp_path / "x.parquet"), "text")


def test_capture_cli_activation_flags_and_dataset(tmp_path, capsys):
    pytest.importorskip("datasets")
    from lazarus_core.cli.main import main
    from tests.routing.tiny_models import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt")
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"body": t, "domain": f"d{i % 2}"}) for i, t in enumerate(TEXTS)) + "\n")
    out = tmp_path / "trace"
    code = main(["capture", "-m", str(ckpt), "--dataset", str(data), "--field", "body", "--label-field", "domain",
                 "-o", str(out), "--hidden-states", "--expert-outputs", "--all-experts", "--sample-tokens", "7",
                 "--activation-dtype", "bf16", "--json"])
    assert code == 0, capsys.readouterr().err
    trace = load_trace(out)
    acts = trace.activations(trace.layers[0])
    assert acts.all_expert_outputs.shape == (7, 8, 32) and acts.expert_outputs.shape == (7, 2, 32)
    assert json.loads((out / "lazarus_labels.json").read_text())["1"] == "d1"
    code = main(["capture", "-m", str(ckpt), "-p", "the word", "-o", str(tmp_path / "u"), "--all-experts"])
    assert code == 2 and "--sample-tokens" in capsys.readouterr().err
