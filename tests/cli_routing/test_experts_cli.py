"""`expert-profile` and `steer` end to end on demo:native, numbers recomputed from the saved trace."""

from __future__ import annotations

import numpy as np
import pytest

from lazarus_core.routing.trace_reader import load_trace

FAST = ["--num-tokens", "256", "--loss-documents", "2", "--baseline-experts", "1"]


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory):
    """One expert-profile run on demo:native (module-scoped: the model runs once for several checks)."""
    import json

    from lazarus_core.cli.main import main
    from lazarus_core.models.builtin import resolve_builtin

    if resolve_builtin("demo:native") is None:
        pytest.skip("demo:native is not installed")
    d = tmp_path_factory.mktemp("profile")
    code = main(["introspect", "moe-expert", "expert-profile", "-m", "demo:native", "--layer", "1", "--expert", "3",
                 *FAST, "--save-trace", str(d / "trace"), "--csv", str(d / "csv"), "--plot", str(d / "fig.png"),
                 "-o", str(d / "out.json")])
    assert code == 0
    return d, json.loads((d / "out.json").read_text())


def test_profile_numbers_match_the_saved_trace(profile_run):
    d, out = profile_run
    assert out["action"] == "expert-profile" and out["layer"] == 1 and out["expert"] == 3
    trace = load_trace(d / "trace")
    assert trace.has_logits and trace.layers == [1]
    ids = trace.layer(1).topk_ids
    hit = (ids == 3).any(1)
    assert out["tokens"] == len(ids) == trace.num_tokens
    assert out["load"]["estimate"] == pytest.approx(hit.mean())
    assert out["load"]["low"] <= hit.mean() <= out["load"]["high"]
    assert out["uniform_load"] == pytest.approx(trace.top_k / trace.num_experts)
    co = {c["expert"]: c["count"] for c in out["coactivated"]}
    for b in range(trace.num_experts):
        if b != 3:
            assert co[b] == int(((ids == 3).any(1) & (ids == b).any(1)).sum())
    logits = trace.layer(1).logits[:, 3].astype(np.float32)
    assert out["top_logit_contexts"][0]["logit"] == pytest.approx(float(logits.max()), abs=1e-3)
    assert {dom["key"] for dom in out["domains"]}                     # the held-out documents carry categories
    loss = out["loss"]
    assert loss["documents"] >= 1 and loss["delta_nll"]["low"] <= loss["delta_nll"]["estimate"] <= loss["delta_nll"]["high"]
    assert len(loss["baseline_experts"]) == 1 and 3 not in loss["baseline_experts"]
    assert (d / "fig.png").stat().st_size > 0
    assert {p.name for p in (d / "csv").iterdir()} >= {"tokens.csv", "coactivation.csv", "domains.csv"}


def test_profile_from_the_saved_trace_agrees(profile_run, run_cli):
    d, first = profile_run
    code, again, err = run_cli("expert-profile", "--trace", str(d / "trace"), "--expert", "3", "--no-loss")
    assert code == 0, err
    assert again["load"] == first["load"] and again["coactivated"] == first["coactivated"]
    assert again["loss"] is None


def test_profile_needs_logits(native_model, run_cli, tmp_path):
    from lazarus_core.routing.capture import capture_routing
    from lazarus_core.routing.corpus import corpus_from_prompts
    from lazarus_core.routing.session import RoutingSession

    s = RoutingSession(native_model)
    capture_routing(s.model, s.tokenizer, corpus_from_prompts(["the cat sat on the mat"]), tmp_path / "t",
                    progress=False)
    code, _, err = run_cli("expert-profile", "--trace", str(tmp_path / "t"), "--expert", "0", output=False)
    assert code == 2 and "--logits" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["expert-profile", "--expert", "99", *FAST], "--expert 99 is out of range"),
    (["expert-profile", "--expert", "0", "--layer", "99", *FAST], "--layer 99 is out of range"),
    (["steer", "--expert", "99", "-p", "the cat"], "--expert 99 is out of range"),
    (["steer", "--expert", "0", "--layer", "99", "-p", "the cat"], "--layer 99 is out of range"),
    (["steer", "--expert", "0", "--target-idx", "40", "-p", "the cat"], "--target-idx 40 is out of range"),
    (["steer", "--expert", "0", "--sweep", "1,x", "-p", "the cat"], "--sweep expects comma-separated numbers"),
])
def test_bad_input_is_one_line(argv, message, native_model, run_cli):
    code, _, err = run_cli(*argv, "-m", native_model, output=False)
    assert code == 2 and message in err and "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("lazarus")]   # (transformers may draw a loading bar)
    assert len(ours) == 1 and ours[0].startswith("lazarus: error:") and message in ours[0]


def test_profile_layer_not_captured(profile_run, run_cli):
    d, _ = profile_run
    code, _, err = run_cli("expert-profile", "--trace", str(d / "trace"), "--expert", "0", "--layer", "2", output=False)
    assert code == 2 and "--layer 2 was not captured" in err


def test_steer_end_to_end(native_model, run_cli, tmp_path):
    code, out, err = run_cli("steer", "-m", native_model, "--layer", "1", "--expert", "3", "-p",
                             "The answer is 2 plus 3 equals", "--sweep", "0,1", "--max-new-tokens", "3",
                             "--baseline-experts", "1", "--plot", str(tmp_path / "s.png"))
    assert code == 0, err
    assert out["action"] == "steer" and out["mode"] == "boost" and out["value"] == 1.0
    assert out["renormalised"] is False                                # OLMoE: no renormalisation
    assert len(out["weight_before"]) == len(out["prompt_ids"]) and out["target_idx"] is None
    assert [s["value"] for s in out["sweep"]] == [0.0, 1.0]
    assert out["sweep"][1]["kl"] == pytest.approx(out["kl"])
    assert out["kl"] >= 0 and len(out["top_before"]) == 5
    assert (tmp_path / "s.png").stat().st_size > 0


def test_steer_with_the_current_weight_changes_nothing(native_model, run_cli):
    prompt = "The answer is 2 plus 3 equals"
    code, first, err = run_cli("steer", "-m", native_model, "--layer", "1", "--expert", "3", "-p", prompt,
                               "--target-idx", "3", "--baseline-experts", "0", "--max-new-tokens", "1")
    assert code == 0, err
    w = first["weight_before"][0]
    code, same, err = run_cli("steer", "-m", native_model, "--layer", "1", "--expert", "3", "-p", prompt,
                              "--target-idx", "3", "--value", repr(w), "--baseline-experts", "0",
                              "--max-new-tokens", "1")
    assert code == 0, err
    assert same["kl"] == 0.0 and same["top_after"] == same["top_before"]
