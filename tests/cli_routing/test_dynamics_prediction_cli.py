"""`attention-prediction`, `context-attention-routing`, `task-prediction` end to end on demo:native and a tiny Qwen3-MoE:
JSON numbers recomputed from the saved trace where they can be, and bad input answered in one line with exit code 2."""

from __future__ import annotations

import numpy as np
import pytest

from lazarus_core.routing.trace_reader import load_trace

FAST = ["--num-tokens", "160", "--steps", "15"]
WORDS = ["the man is here", "a man and the water", "the day is long", "we see the way", "the time to go home",
         "he made the first one"]


def _check_interval(iv: dict) -> None:
    assert iv["low"] <= iv["estimate"] + 1e-9 and iv["estimate"] <= iv["high"] + 1e-9


@pytest.fixture(params=["native", "other"])
def model(request):
    """demo:native (skipped when not installed) and the tiny Qwen3-MoE checkpoint."""
    return request.getfixturevalue("native_model" if request.param == "native" else "other_family_model")


def test_attention_prediction_end_to_end(model, run_cli, tmp_path):
    code, out, err = run_cli("attention-prediction", "-m", model, *FAST, "--layers", "1", "--save-trace",
                             str(tmp_path / "t"), "--plot", str(tmp_path / "f.png"), "--csv", str(tmp_path / "csv"))
    assert code == 0, err
    assert out["action"] == "attention-prediction" and out["model"] == model
    (layer,) = out["layers"]
    assert layer["layer"] == 1 and out["routing_agreement"] > 0.95
    assert set(layer["predictors"]) == {"majority", "token_lookup", "attention_probe", "residual_probe",
                                        "router_input_probe"}
    for p in layer["predictors"].values():
        _check_interval(p["accuracy"])
        _check_interval(p["topk_recall"])
    # the majority baseline recomputed from the saved trace with the same document split
    from lazarus_core.analysis.attention_features import trace_windows
    from lazarus_core.analysis.attention_prediction import split_documents

    trace = load_trace(tmp_path / "t")
    end = trace_windows(trace, 160)[-1][1]
    docs, ids = np.asarray(trace.doc_ids)[:end], np.asarray(trace.layer(1).topk_ids)[:end]
    test = split_documents(docs, 0.3, seed=0)
    top = np.bincount(ids[~test, 0], minlength=trace.num_experts).argmax()
    assert layer["predictors"]["majority"]["accuracy"]["estimate"] == pytest.approx(np.mean(ids[test, 0] == top))
    assert layer["test_tokens"] == int(test.sum())
    d = layer["decomposition"]
    assert d["attention_share"]["estimate"] + d["residual_share"]["estimate"] == pytest.approx(1.0, abs=1e-6)
    assert d["reconstruction_error"] < 1e-4 and "rms" in d["norm_rule"]
    assert (tmp_path / "f.png").stat().st_size > 0
    assert {p.name for p in (tmp_path / "csv").iterdir()} == {"predictors.csv", "decomposition.csv"}


def test_attention_prediction_from_a_saved_trace(native_model, run_cli, tmp_path):
    code, first, err = run_cli("attention-prediction", "-m", native_model, *FAST, "--layers", "2",
                               "--save-trace", str(tmp_path / "t"), "--no-decomposition")
    assert code == 0, err
    code, again, err = run_cli("attention-prediction", "--trace", str(tmp_path / "t"), *FAST, "--no-decomposition")
    assert code == 0, err
    assert again["layers"][0]["predictors"] == first["layers"][0]["predictors"]
    assert again["layers"][0]["decomposition"] is None


def test_context_attention_routing_end_to_end(model, run_cli, tmp_path):
    native = model == "demo:native"
    extra = [] if native else ["--token", "the", "--contexts", *WORDS]
    code, out, err = run_cli("context-attention-routing", "-m", model, *extra, "--permutations", "99",
                             "--plot", str(tmp_path / "f.png"), "--csv", str(tmp_path / "csv"))
    assert code == 0, err
    assert out["action"] == "context-attention-routing" and out["token"] == ("127" if native else "the")
    n = len(out["contexts"])
    assert n == (10 if native else len(WORDS)) and len(out["occurrences"]) == n
    for layer in out["layers"]:
        att, rout = np.array(layer["attention_similarity"]), np.array(layer["routing_similarity"])
        assert att.shape == rout.shape == (n, n) and np.allclose(np.diag(rout), 1)
        experts = np.array(out["experts"][str(layer["layer"])])
        i, j = 0, 1
        a, b = set(experts[i]), set(experts[j])
        assert rout[i, j] == pytest.approx(len(a & b) / len(a | b), abs=1e-6)
        m = layer["mantel"]
        assert 0 < m["p_value"] <= 1 and m["permutations"] == 99 and layer["q_value"] >= m["p_value"] - 1e-12
    assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "csv" / "pairs.csv").is_file()


def test_context_attention_routing_rows_and_probabilities(native_model, run_cli):
    code, out, err = run_cli("context-attention-routing", "-m", native_model, "-t", "127", "--layer", "1",
                             "--attention-similarity", "rows", "--routing-similarity", "probability",
                             "--permutations", "50")
    assert code == 0, err
    assert [l["layer"] for l in out["layers"]] == [1] and out["attention_similarity"] == "rows"
    assert "correlation" in out["definitions"]["routing"]


def test_task_prediction_end_to_end(model, run_cli, tmp_path):
    code, out, err = run_cli("task-prediction", "-m", model, *FAST, "--probe-layer", "0", "--save-trace",
                             str(tmp_path / "t"), "--prefetch-size", "3", "--bandwidth-gbs", "10",
                             "--plot", str(tmp_path / "f.png"), "--csv", str(tmp_path / "csv"))
    assert code == 0, err
    assert out["action"] == "task-prediction" and out["probe_layer"] == 0
    trace = load_trace(tmp_path / "t")
    assert trace.has_hidden and out["layers"] and all(l["layer"] > 0 for l in out["layers"])
    for layer in out["layers"]:
        assert layer["prefetch_size"] == 3
        for p in layer["prefetchers"].values():
            _check_interval(p["recall"])
            _check_interval(p["precision"])
        cost = layer["cost"]
        assert cost["resident_bytes"] == 3 * cost["expert_bytes"] > 0
        assert cost["prefetch_ms"] == pytest.approx(3 * cost["expert_bytes"] / 10e9 * 1e3)
        assert len(layer["curve"]) == trace.num_experts
    assert out["bytes_source"] == "checkpoint (as stored)"
    assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "csv" / "curve.csv").is_file()


def test_task_prediction_from_a_saved_trace_needs_hidden_states(native_model, run_cli, tmp_path):
    code, _, err = run_cli("attention-prediction", "-m", native_model, *FAST, "--layers", "1", "--no-decomposition",
                           "--save-trace", str(tmp_path / "t"))
    assert code == 0, err
    code, _, err = run_cli("task-prediction", "--trace", str(tmp_path / "t"), *FAST, output=False)
    assert code == 2 and "--hidden-states" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["context-attention-routing", "--token", "zebra", "--contexts", "one two", "three four", "five six"],
     "does not occur"),
    (["context-attention-routing", "--token", "127", "--layer", "99"], "--layer 99 is out of range"),
    (["attention-prediction", "--layer", "99", *FAST], "--layer 99 is out of range"),
    (["task-prediction", "--probe-layer", "3", *FAST], "--probe-layer 3 has no later MoE layer"),
    (["task-prediction", "--probe-layer", "2", "--layers", "1,3", *FAST], "not after --probe-layer 2"),
    (["task-prediction", "--probe-layer", "9", *FAST], "--probe-layer 9 is out of range"),
    (["task-prediction", "--prefetch-size", "99", *FAST], "--prefetch-size"),
    (["attention-prediction", "--test-fraction", "1.5", *FAST], "--test-fraction"),
])
def test_bad_input_gets_one_line(native_model, run_cli, argv, message):
    code, _, err = run_cli(*argv[:1], "-m", native_model, *argv[1:], output=False)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err
