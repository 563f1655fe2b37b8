"""router-entropy, router-distributions and router-metrics end to end on demo:native, numbers recomputed from the trace."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lazarus_core.routing.trace_reader import load_trace
from tests.analysis.test_router_entropy import reference_entropy, reference_probabilities

PROMPTS = ["the water was long and people said no", "it is what it is", "one two three four five six seven",
           "def add(a, b): return a + b", "if the man is tall then the day is long"]


def _capture(tmp_path, name: str, *extra: str) -> str:
    from lazarus_core.cli.main import main

    out = tmp_path / name
    assert main(["capture", "-m", "demo:native", "-p", *PROMPTS, "-o", str(out), "--no-progress", *extra]) == 0
    return str(out)


@pytest.fixture(scope="module")
def traces(tmp_path_factory, native_model):
    """A trace with logits at layers 0 and 2, and the same tokens without logits at every layer."""
    tmp = tmp_path_factory.mktemp("metrics_cli")
    return {"logits": _capture(tmp, "with_logits", "--logits", "--layers", "0,2"),
            "bare": _capture(tmp, "bare")}


def test_router_entropy_captures_on_the_fly(native_model, run_cli, tmp_path):
    saved = tmp_path / "saved"
    code, payload, err = run_cli("router-entropy", "-m", native_model, "--num-tokens", "200", "--save-trace",
                                 str(saved), "--n-boot", "200")
    assert code == 0, err
    assert payload["action"] == "router-entropy" and payload["scoring"] == "softmax"
    trace = load_trace(saved)
    assert trace.has_logits and [entry["layer"] for entry in payload["layers"]] == trace.layers
    for entry in payload["layers"]:
        p = reference_probabilities(trace.layer(entry["layer"]).logits, "softmax")
        assert entry["mean_entropy_nats"] == pytest.approx(reference_entropy(p).mean(), abs=1e-5)
        assert entry["max_entropy_nats"] == pytest.approx(math.log(trace.num_experts))
        marginal = p.mean(0)
        assert entry["marginal_entropy_nats"] == pytest.approx(-(marginal * np.log(marginal)).sum(), abs=1e-5)
        assert entry["mean_normalized_entropy"] == pytest.approx(entry["mean_entropy_nats"] / math.log(trace.num_experts))
        ci = entry["mean_entropy_ci"]
        assert ci["low"] <= entry["mean_entropy_nats"] <= ci["high"] and ci["method"] == "bootstrap-documents"


def test_router_entropy_and_distributions_from_a_trace_with_plot_and_csv(traces, run_cli, tmp_path):
    code, payload, err = run_cli("router-entropy", "--trace", traces["logits"], "--layers", "2", "--plot",
                                 str(tmp_path / "h.png"), "--csv", str(tmp_path / "csv"), "--n-boot", "100")
    assert code == 0, err
    assert [entry["layer"] for entry in payload["layers"]] == [2]
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert {p.name for p in (tmp_path / "csv").iterdir()} == {
        "router_entropy_layers.csv", "router_entropy_histograms.csv", "router_entropy_tokens.csv"}
    code, payload, err = run_cli("router-distributions", "--trace", traces["logits"], "--plot",
                                 str(tmp_path / "d.pdf"), "--csv", str(tmp_path / "dcsv"), "--n-boot", "100")
    assert code == 0, err
    trace = load_trace(traces["logits"])
    for entry in payload["layers"]:
        lt = trace.layer(entry["layer"])
        p = reference_probabilities(lt.logits, "softmax")
        slot_p = np.take_along_axis(p, lt.topk_ids.astype(np.int64), 1).mean(0)
        assert entry["mean_probability_per_rank"] == pytest.approx(slot_p.tolist(), abs=1e-5)
        assert sum(entry["probabilities"]["counts"]) == trace.num_tokens * trace.num_experts
        assert entry["baselines"]["uniform_topk_mass"] == trace.top_k / trace.num_experts
    assert (tmp_path / "d.pdf").stat().st_size > 1000 and (tmp_path / "dcsv" / "router_distributions_slots.csv").exists()


def test_router_metrics_with_saturation_against_a_second_trace(traces, run_cli, tmp_path):
    code, payload, err = run_cli("router-metrics", "--trace", traces["bare"], "--compare-trace", traces["logits"],
                                 "--layers", "0,2", "--min-count", "2", "--permutations", "3", "--n-boot", "100",
                                 "--plot", str(tmp_path / "m.png"), "--csv", str(tmp_path / "mcsv"))
    assert code == 0, err
    trace = load_trace(traces["bare"])
    for entry in payload["layers"]:
        ids = trace.layer(entry["layer"]).topk_ids
        freq = np.bincount(ids.ravel(), minlength=trace.num_experts) / trace.num_tokens
        assert entry["selection_frequency"] == pytest.approx(freq.tolist(), abs=1e-6)
        assert sum(entry["selection_frequency"]) == pytest.approx(trace.top_k)
        assert 0 < entry["vocabulary_specialisation"] <= 1
        # the same model on the same tokens: routing identical, saturation 1 (vs a far lower chance level)
        assert entry["saturation"]["router_saturation"] == pytest.approx(1.0)
        assert entry["saturation"]["router_saturation_baseline"] < 0.6
    assert (tmp_path / "m.png").exists() and (tmp_path / "mcsv" / "router_metrics_experts.csv").exists()


def _one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("lazarus: error")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err


@pytest.mark.parametrize("action", ["router-entropy", "router-distributions"])
def test_a_trace_without_logits_names_the_flag(action, traces, run_cli):
    code, payload, err = run_cli(action, "--trace", traces["bare"])
    assert code == 2 and payload is None
    _one_line(err, "--logits")


@pytest.mark.parametrize("action", ["router-entropy", "router-distributions", "router-metrics"])
def test_a_layer_not_captured_names_the_flag(action, traces, run_cli):
    code, _, err = run_cli(action, "--trace", traces["logits"], "--layers", "1")
    assert code == 2
    _one_line(err, "--layers", "1")


def test_compare_trace_of_other_tokens_is_refused(traces, run_cli, tmp_path):
    other = _capture(tmp_path, "other", "--max-tokens", "20")
    code, _, err = run_cli("router-metrics", "--trace", traces["bare"], "--compare-trace", other)
    assert code == 2
    _one_line(err, "--compare-trace", "tokens")
    code, _, err = run_cli("router-metrics", "--trace", traces["bare"], "--min-count", "0")
    assert code == 2
    _one_line(err, "--min-count")
