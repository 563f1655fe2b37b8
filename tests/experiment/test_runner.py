"""`lazarus experiment run`: configs are checked, steps write results and an index, reruns resume, failures are kept."""

from __future__ import annotations

import json

import pytest

from lazarus_core.cli.main import main
from lazarus_core.experiment import load_config, run_experiment
from lazarus_core.experiment.runner import builtin_config_path


@pytest.fixture
def native():
    from lazarus_core.models.builtin import resolve_builtin

    if resolve_builtin("demo:native") is None:
        pytest.skip("demo:native is not installed")
    return "demo:native"


def _write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


SMALL = """
name: small
model: demo:native
capture: {num_tokens: 400, logits: true}
analyses:
  - {name: load, action: analyze}
  - {name: weights, action: weights, args: {layers: "0,1"}}
  - {name: bad-token, action: token-routing, args: {token: "zzqqxx-not-a-token-zzqq"}}
"""


@pytest.mark.parametrize("text, message", [
    ("model: demo:native\n", "missing key 'analyses'"),
    ("model: demo:native\nanalyses: []\n", "non-empty list"),
    ("model: demo:native\nanalyses:\n  - {action: no-such-action}\n", "unknown action 'no-such-action'"),
    ("model: demo:native\nanalyses:\n  - {action: analyze}\n  - {action: analyze}\n", "duplicate name 'analyze'"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_configs_are_clear_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, text))
    code = main(["experiment", "run", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "out")])
    assert code == 2


def test_unknown_option_of_a_step_names_it(tmp_path, native):
    path = _write(tmp_path, "model: demo:native\ncapture: {num_tokens: 100}\nanalyses:\n"
                            "  - {name: x, action: analyze, args: {no_such_flag: 1}}\n")
    report = run_experiment(path, tmp_path / "out")
    assert report.steps[0].status == "failed" and "--no-such-flag" in report.steps[0].error


def test_run_writes_results_index_and_resumes(tmp_path, native, capsys):
    path = _write(tmp_path, SMALL)
    out = tmp_path / "out"
    code = main(["experiment", "run", str(path), "--out", str(out)])
    assert code == 1                                           # one step failed, the others ran
    index = json.loads((out / "index.json").read_text())
    status = {s["name"]: s["status"] for s in index["steps"]}
    assert status == {"load": "done", "weights": "done", "bad-token": "failed"} and index["complete"]
    load = json.loads((out / "results" / "load.json").read_text())
    assert load["action"] == "analyze" and load["num_tokens"] == json.loads((out / "trace" / "trace.json").read_text())["num_tokens"]
    assert [l["layer"] for l in json.loads((out / "results" / "weights.json").read_text())["layers"]] == [0, 1]
    assert (out / "figures" / "load.png").exists() is False                 # analyze takes no --plot
    assert "token-routing" in (out / "logs" / "bad-token.txt").read_text()
    # rerun: done steps are skipped, the failed one is retried; changed options rerun that step only
    report = run_experiment(path, out)
    assert [s.status for s in report.steps] == ["skipped", "skipped", "failed"]
    path.write_text(SMALL.replace('layers: "0,1"', 'layers: "2"'))
    report = run_experiment(path, out)
    assert [s.status for s in report.steps] == ["skipped", "done", "failed"]
    assert [l["layer"] for l in json.loads((out / "results" / "weights.json").read_text())["layers"]] == [2]
    capsys.readouterr()
    assert main(["experiment", "status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "small"
    assert main(["experiment", "status", str(tmp_path)]) == 2
    assert "not an experiment directory" in capsys.readouterr().err


def test_an_interrupted_capture_resumes(tmp_path, native, monkeypatch):
    from lazarus_core.routing.trace_writer import TraceWriter

    path = _write(tmp_path, SMALL.replace("num_tokens: 400", "num_tokens: 1200").replace(
        "logits: true", "logits: true, seq_len: 64, shard_tokens: 256"))
    real_flush, calls = TraceWriter.flush, {"n": 0}

    def crashing_flush(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_flush(self)

    monkeypatch.setattr(TraceWriter, "flush", crashing_flush)
    with pytest.raises(RuntimeError, match="rerun to resume"):
        run_experiment(path, tmp_path / "out")
    monkeypatch.setattr(TraceWriter, "flush", real_flush)
    report = run_experiment(path, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "trace" / "trace.json").read_text())
    assert meta["complete"] and report.steps[0].status == "done"


@pytest.mark.slow
def test_the_shipped_example_runs_every_routing_analysis(tmp_path, native):
    cfg = load_config("demo:routing")
    actions = {s.action for s in cfg.analyses}
    routing_actions = {"analyze", "weights", "heatmap", "full-taxonomy", "domain-test", "router-entropy",
                       "router-distributions", "router-metrics", "expert-similarity", "expert-projection",
                       "expert-profile", "steer", "token-routing", "context-test", "context-window",
                       "attention-routing", "attention-pattern", "trace", "ablate", "compare", "chat",
                       "cold-experts", "expert-circuits", "generation-dynamics", "expert-interference",
                       "expert-merging", "routing-manipulation", "attention-prediction",
                       "context-attention-routing", "task-prediction"}
    assert routing_actions <= actions
    report = run_experiment("demo:routing", tmp_path / "out")
    assert not report.failed, [(s.name, s.error) for s in report.failed]
    for step in report.steps:
        payload = json.loads((tmp_path / "out" / "results" / f"{step.name}.json").read_text())
        assert payload, step.name
    assert builtin_config_path("demo:routing").read_text().startswith("#")
