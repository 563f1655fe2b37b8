"""`cold-experts`, `expert-circuits`, `generation-dynamics` end to end on demo:native and a tiny Qwen3-MoE; bad input exits 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lazarus_core.routing.trace_reader import load_trace

COLD = ["--num-tokens", "256", "--loss-documents", "2", "--baseline-draws", "1"]
GEN = ["--max-new-tokens", "4", "--permutations", "20"]


@pytest.fixture(params=["native", "other"])
def model(request):
    return request.getfixturevalue("native_model" if request.param == "native" else "other_family_model")


def test_cold_experts_end_to_end(model, run_cli, tmp_path):
    # a high threshold (half the uniform share) so that the small models have cold experts to ablate
    code, out, err = run_cli("cold-experts", "-m", model, *COLD, "--threshold", "0.1", "--save-trace",
                             str(tmp_path / "t"), "--plot", str(tmp_path / "cold.png"), "--csv", str(tmp_path / "csv"))
    assert code == 0, err
    assert out["action"] == "cold-experts" and out["model"] == model and out["threshold"] == 0.1
    trace = load_trace(tmp_path / "t")
    assert [l["layer"] for l in out["layers"]] == trace.layers
    for layer in out["layers"]:
        ids = trace.layer(layer["layer"]).topk_ids
        shares = np.bincount(ids.reshape(-1), minlength=trace.num_experts) / ids.size
        assert layer["shares"] == pytest.approx(shares.tolist())
        assert sorted(c["expert"] for c in layer["cold_experts"]) == sorted(np.flatnonzero(shares < 0.1).tolist())
        for c in layer["cold_experts"]:
            a = c["ablation"]
            assert a is None or (a["ci_low"] <= a["delta_nll"] <= a["ci_high"] and
                                 a["prunable"] == (a["ci_high"] <= out["tolerance"]))
    assert out["num_cold"] == sum(len(l["cold_experts"]) for l in out["layers"])
    if out["num_cold"]:
        assert out["prune_all"] is not None or any(l["skipped"] for l in out["layers"])
    assert (tmp_path / "cold.png").stat().st_size > 0 and (tmp_path / "csv" / "shares.csv").is_file()
    # from the saved trace, without a model run: the same distribution, no ablation
    code, again, err = run_cli("cold-experts", "--trace", str(tmp_path / "t"), "--threshold", "0.1", "--no-loss")
    assert code == 0, err
    assert [l["shares"] for l in again["layers"]] == [l["shares"] for l in out["layers"]]
    assert again["prune_all"] is None


def test_expert_circuits_end_to_end(model, run_cli, tmp_path):
    code, out, err = run_cli("expert-circuits", "-m", model, "--num-tokens", "512", "--save-trace",
                             str(tmp_path / "t"), "--plot", str(tmp_path / "c.png"), "--csv", str(tmp_path / "csv"))
    assert code == 0, err
    assert out["action"] == "expert-circuits" and out["length"] == 2
    trace = load_trace(tmp_path / "t")
    assert out["windows"] == [[a, b] for a, b in zip(trace.layers[:-1], trace.layers[1:])]
    assert out["tests"] == len(out["windows"]) * trace.num_experts ** 2
    assert out["significant_permuted"] is not None and out["significant_permuted"] <= max(2, out["significant"] // 10)
    for c in out["circuits"]:
        (l1, e1), (l2, e2) = c["path"]
        hit = (trace.layer(l1).topk_ids == e1).any(1) & (trace.layer(l2).topk_ids == e2).any(1)
        assert c["count"] == int(hit.sum()) and c["q_value"] < 0.05 and c["lift"] > 1
    keys = [(c["q_value"], -c["lift"]) for c in out["circuits"]]
    assert keys == sorted(keys)
    assert (tmp_path / "c.png").stat().st_size > 0
    code, three, err = run_cli("expert-circuits", "--trace", str(tmp_path / "t"), "--length", "3",
                               "--through", f"{trace.layers[1]}:0")
    if len(trace.layers) < 3:                                    # the tiny Qwen3-MoE has two MoE layers
        assert code == 2 and "--length 3" in err
        return
    assert code == 0, err
    assert three["length"] == 3 and all([trace.layers[1], 0] in c["path"] for c in three["circuits"])
    assert three["tests"] == (len(trace.layers) - 2) * trace.num_experts ** 3


def test_generation_dynamics_end_to_end(model, run_cli, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [{"prompt": "the a of", "answer": "the"},
                                                         {"prompt": "he was", "answer": "zzz"},
                                                         {"prompt": "to be"}]) + "\n")
    code, out, err = run_cli("generation-dynamics", "-m", model, "-p", "one two", "--prompts", str(prompts), *GEN,
                             "--plot", str(tmp_path / "g.png"), "--csv", str(tmp_path / "csv"))
    assert code == 0, err
    assert out["action"] == "generation-dynamics" and out["temperature"] == 0.0
    assert [g["prompt"] for g in out["generations"]] == ["one two", "the a of", "he was", "to be"]
    assert [g["answer"] for g in out["generations"]] == [None, "the", "zzz", None]
    assert out["generations"][2]["correct"] is False and out["accuracy"]["n_units"] == 2
    for layer in out["layers"]:
        steps = sum(max(g["steps"] - 1, 0) for g in out["generations"])
        assert layer["transitions"] == steps == int(np.sum(layer["handoff"]))
        assert layer["jaccard_shuffled"]["low"] <= layer["jaccard_shuffled"]["high"]
    g = out["generations"][0]
    assert all(len(r) == g["steps"] for r in g["routing"].values())
    assert (tmp_path / "g.png").stat().st_size > 0 and (tmp_path / "csv" / "steps.csv").is_file()
    code, s1, err = run_cli("generation-dynamics", "-m", model, "-p", "one two", *GEN, "--temperature", "1.0",
                            "--seed", "4")
    code2, s2, _ = run_cli("generation-dynamics", "-m", model, "-p", "one two", *GEN, "--temperature", "1.0",
                           "--seed", "4")
    assert code == code2 == 0, err
    assert s1["generations"][0]["new_token_ids"] == s2["generations"][0]["new_token_ids"]


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert all(n in lines[0] for n in needles), lines[0]


def test_bad_input_gets_one_line_and_exit_2(native_model, run_cli, tmp_path):
    m = native_model
    code, _, err = run_cli("generation-dynamics", "-m", m, "-p", "  ", *GEN, output=False)
    _one_line_error(code, err, "--prompt", "empty")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_cli("generation-dynamics", "-m", m, "--prompts", str(empty), *GEN, output=False)
    _one_line_error(code, err, "--prompts", "no prompts")
    code, _, err = run_cli("generation-dynamics", "-m", m, "-p", "x", "--layers", "0,99", *GEN, output=False)
    _one_line_error(code, err, "--layers", "99")
    code, _, err = run_cli("cold-experts", "-m", m, "--layer", "42", *COLD, output=False)
    _one_line_error(code, err, "--layer", "42")
    code, _, err = run_cli("expert-circuits", "-m", m, "--num-tokens", "128", "--through", "1:99", output=False)
    _one_line_error(code, err, "--through", "99")
    code, _, err = run_cli("expert-circuits", "-m", m, "--num-tokens", "128", "--through", "77:0", output=False)
    _one_line_error(code, err, "--through", "77")
    code, _, err = run_cli("expert-circuits", "-m", m, "--num-tokens", "128", "--layers", "0,1", "--length", "3",
                           output=False)
    _one_line_error(code, err, "--length 3")
    code, _, err = run_cli("cold-experts", "-m", m, *COLD, "--threshold", "0", output=False)
    _one_line_error(code, err, "--threshold")
