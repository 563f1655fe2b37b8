"""expert-interference, expert-merging, routing-manipulation end to end on demo:native and a tiny Qwen3-MoE."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(params=["native", "other"])
def model(request):
    return request.getfixturevalue("native_model" if request.param == "native" else "other_family_model")


INTERFERENCE = ("--num-tokens", "160", "--documents", "3", "--pairs", "1", "--layers", "0,1")
MERGING = ("--num-tokens", "200", "--loss-documents", "2", "--max-merges", "1", "--random-repeats", "1",
           "--output-rows", "32")
MANIPULATION = ("--trials", "2", "--steps", "2", "--candidates", "4", "--substitutions", "4", "--noise", "0,0.5",
                "--noise-draws", "2", "--prompt-tokens", "8")


def test_expert_interference(run_cli, model, tmp_path):
    code, payload, err = run_cli("expert-interference", "-m", model, *INTERFERENCE, "--plot", str(tmp_path / "f.png"),
                                 "--csv", str(tmp_path / "csv"))
    assert code == 0, err
    assert payload["action"] == "expert-interference" and payload["model"] == model
    K = payload["top_k"]
    assert {r["scope"] for r in payload["topk"]} == {"all", "layer 0", "layer 1"}
    noop = [r for r in payload["topk"] if r["k"] == K]
    assert all(abs(r["delta_nll"]["estimate"]) < 1e-6 for r in noop)
    one = next(r for r in payload["topk"] if r["scope"] == "all" and r["k"] == 1)
    assert one["delta_nll"]["low"] <= one["delta_nll"]["estimate"] <= one["delta_nll"]["high"]
    assert one["kl"]["estimate"] > 0
    assert payload["pairs"] and {"delta_nll", "random_delta_nll", "compatibility", "control"} <= set(payload["pairs"][0])
    assert payload["degraded_positions"]
    assert (tmp_path / "f.png").is_file() and (tmp_path / "csv" / "topk.csv").is_file()


def test_expert_merging(run_cli, model, tmp_path):
    code, payload, err = run_cli("expert-merging", "-m", model, "-t", "0.5", *MERGING, "--plot", str(tmp_path / "m.png"),
                                 "--csv", str(tmp_path / "csv"))
    assert code == 0, err
    assert payload["action"] == "expert-merging" and payload["threshold"] == 0.5
    first = payload["distributions"][str(payload["layers"][0])]
    assert {d["measure"] for d in first} == {"weights", "deltas", "routing", "outputs"}
    assert len(payload["candidates"]) == len(payload["layers"]) * payload["num_experts"] * (payload["num_experts"] - 1) // 2
    row = payload["pareto"][0]
    assert row["merges"] == 1 and row["bytes_saved"] > 0
    assert {"delta_nll", "kl", "random_delta_nll", "random_kl"} <= set(row)
    assert (tmp_path / "m.png").is_file() and (tmp_path / "csv" / "pareto.csv").is_file()


def test_native_similarity_next_to_upcycled(run_cli, native_model, upcycled_model):
    """The native model's experts are unrelated by weight; the upcycled one's share a dense base."""
    stats = {}
    for spec in (native_model, upcycled_model):
        code, payload, err = run_cli("expert-merging", "-m", spec, "--layer", "1", "--num-tokens", "128", "--no-loss",
                                     "--output-rows", "16")
        assert code == 0, err
        stats[spec] = {d["measure"]: d for d in payload["distributions"]["1"]}
    native, upcycled = stats[native_model]["weights"], stats[upcycled_model]["weights"]
    assert native["max"] < 0.2 < upcycled["median"]
    assert native["mean"] < 5 * native["null_q95"] + 0.05


def test_routing_manipulation(run_cli, model, tmp_path):
    code, payload, err = run_cli("routing-manipulation", "-m", model, "--layer", "1", "--expert", "1", *MANIPULATION,
                                 "--plot", str(tmp_path / "r.png"), "--csv", str(tmp_path / "csv"))
    assert code == 0, err
    assert payload["action"] == "routing-manipulation" and payload["layer"] == 1 and payload["expert"] == 1
    assert payload["prompts"] == 2
    assert payload["gradient"]["method"] == "gradient" and payload["random"]["method"] == "random"
    noise0 = next(f for f in payload["flips"] if f["perturbation"] == "noise" and f["noise_ratio"] == 0.0)
    assert noise0["flips"] == 0
    assert (tmp_path / "r.png").is_file() and (tmp_path / "csv" / "flips.csv").is_file()


def test_routing_manipulation_with_prompts(run_cli, native_model):
    code, payload, err = run_cli("routing-manipulation", "-m", native_model, "--expert", "0", "-p", "The cat sat on the",
                                 "-p", "Two plus two is", *MANIPULATION[4:])
    assert code == 0, err
    assert payload["prompts"] == 2


@pytest.mark.parametrize("argv, message", [
    (("routing-manipulation", "--expert", "99", "--layer", "1"), "--expert 99"),
    (("routing-manipulation", "--expert", "0", "--layer", "77"), "--layer 77"),
    (("routing-manipulation", "--expert", "0", "-p", "  "), "empty"),
    (("routing-manipulation", "--expert", "0", "--steps", "0"), "--steps"),
    (("expert-interference", "--layers", "0,42"), "--layers 42"),
    (("expert-interference", "--k-values", "0"), "--k-values"),
    (("expert-merging", "--layer", "9"), "--layer 9"),
    (("expert-merging", "--loss-documents", "0"), "--loss-documents"),
])
def test_bad_input_one_line_exit_2(run_cli, native_model, argv, message):
    code, payload, err = run_cli(argv[0], "-m", native_model, *argv[1:])
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("lazarus: error:") and message in lines[0], err
