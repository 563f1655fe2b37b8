"""expert-similarity and expert-projection end to end on demo:native, recomputed from the trace, and bad input."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest

from lazarus_core.routing.trace_reader import load_trace

FAST = ["--num-tokens", "128", "--splits", "6"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory, native_model):
    """Two captures of the same 256 held-out tokens: with every expert's outputs (128 sampled) and without."""
    from lazarus_core.cli.main import main
    from lazarus_core.models.builtin import resolve_builtin

    root = tmp_path_factory.mktemp("activations")
    heldout = str(resolve_builtin(native_model) / "heldout.jsonl")
    common = ["capture", "-m", native_model, "--jsonl", heldout, "--max-tokens", "256", "--no-progress"]
    full, plain = root / "full", root / "plain"
    assert main([*common, "-o", str(full), "--all-experts", "--hidden-states", "--sample-tokens", "128"]) == 0
    assert main([*common, "-o", str(plain)]) == 0
    return full, plain


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased linear CKA from explicit Gram matrices (Song et al. 2012 eq. 5)."""
    def hsic(k, l):
        n = k.shape[0]
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0.0)
        np.fill_diagonal(l, 0.0)
        one = np.ones(n)
        return ((np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                 - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3)))
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_expert_similarity_on_the_fly_with_plot_and_csv(native_model, run_cli, tmp_path):
    plot, tables, saved = tmp_path / "sim.png", tmp_path / "csv", tmp_path / "trace"
    code, payload, err = run_cli("expert-similarity", "-m", native_model, *FAST, "--layers", "0,3",
                                 "--plot", str(plot), "--csv", str(tables), "--save-trace", str(saved))
    assert code == 0, err
    assert payload["action"] == "expert-similarity" and payload["method"] == "cka"
    assert [l["layer"] for l in payload["layers"]] == [0, 3]
    layer = payload["layers"][1]
    m = np.array(layer["matrix"])
    assert m.shape == (8, 8) and np.allclose(np.diag(m), 1.0, atol=1e-6) and np.allclose(m, m.T)
    assert layer["num_tokens"] == 128 and layer["estimator"] == "unbiased"
    assert layer["ceiling"]["max_similarity"] == 1.0 and layer["ceiling"]["n_splits"] == 6
    floor = layer["floor"]
    assert np.array(floor["matrix"]).shape == (8, 8)
    mean = layer["off_diagonal"]["mean"]
    assert mean["low"] < mean["estimate"] < mean["high"]
    docs = len(np.unique(load_trace(saved).doc_ids[load_trace(saved).activations(3).sample_index]))
    assert (mean["method"], mean["n_units"]) == (("half-sample-documents", docs) if docs >= 10 else
                                                 ("half-sample-tokens", 128))
    assert floor["excess"]["estimate"] == pytest.approx(mean["estimate"] - floor["off_diagonal"]["mean"]["estimate"],
                                                        abs=1e-6)
    # recompute one pair from the saved trace
    acts = load_trace(saved).activations(3)
    out = acts.all_expert_outputs.astype(np.float64)
    assert m[1, 5] == pytest.approx(_reference_cka(out[:, 1], out[:, 5]), abs=1e-5)
    assert plot.stat().st_size > 0
    with open(tables / "expert_similarity_pairs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 28 and {"similarity", "floor_similarity"} <= set(rows[0])
    assert (tables / "expert_similarity_summary.csv").is_file()


def test_expert_similarity_cosine_from_a_trace(traces, run_cli):
    full, _ = traces
    code, payload, err = run_cli("expert-similarity", "--trace", str(full), "--method", "cosine", "--splits", "6",
                                 "--layers", "1")
    assert code == 0, err
    (layer,) = payload["layers"]
    assert layer["estimator"] is None and layer["layer"] == 1
    out = load_trace(full).activations(1).all_expert_outputs.astype(np.float64)
    unit = out / np.linalg.norm(out, axis=2, keepdims=True)
    assert layer["matrix"][0][2] == pytest.approx(float(np.mean(np.sum(unit[:, 0] * unit[:, 2], axis=1))), abs=1e-5)
    # random experts with zero-mean weights point in unrelated directions
    assert abs(layer["floor"]["off_diagonal"]["mean"]["estimate"]) < 0.05


def test_expert_projection_from_a_trace_with_plot_csv_and_points(traces, run_cli, tmp_path):
    full, _ = traces
    plot, tables = tmp_path / "proj.pdf", tmp_path / "csv"
    code, payload, err = run_cli("expert-projection", "--trace", str(full), "--permutations", "5", "--points",
                                 "--plot", str(plot), "--csv", str(tables))
    assert code == 0, err
    assert payload["action"] == "expert-projection" and payload["method"] == "pca"
    assert [l["layer"] for l in payload["layers"]] == load_trace(full).layers
    layer = payload["layers"][0]
    assert layer["num_points"] == 128 * 8 == len(layer["points"]["x"])
    evr = layer["explained_variance_ratio"]
    assert 0 < evr[1] <= evr[0] < 1
    sep = layer["separation"]
    assert sep["majority_rate"] == pytest.approx(1 / 8)
    assert sep["accuracy"]["low"] <= sep["accuracy"]["estimate"] <= sep["accuracy"]["high"]
    assert sep["n_permutations"] == 5 and 0 < sep["p_value"] <= 1
    # the PCA axes: recompute the first component's variance share from the trace
    out = load_trace(full).activations(layer["layer"]).all_expert_outputs.astype(np.float64).reshape(-1, 128)
    sv = np.linalg.svd(out - out.mean(axis=0), compute_uv=False)
    assert evr[0] == pytest.approx(sv[0] ** 2 / np.sum(sv ** 2), rel=1e-3)
    assert plot.stat().st_size > 0
    with open(tables / "expert_projection_points.csv") as f:
        assert sum(1 for _ in f) == 1 + 128 * 8 * len(payload["layers"])


def test_a_trace_without_all_experts_names_the_flag(traces, run_cli):
    _, plain = traces
    for action in ("expert-similarity", "expert-projection"):
        code, payload, err = run_cli(action, "--trace", str(plain))
        assert code == 2 and payload is None
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "--all-experts" in lines[0], err


def test_umap_without_umap_learn_and_a_layer_not_captured(traces, run_cli, monkeypatch):
    full, _ = traces
    monkeypatch.setitem(sys.modules, "umap", None)
    code, _, err = run_cli("expert-projection", "--trace", str(full), "--method", "umap")
    assert code == 2 and "pip install umap-learn" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("expert-similarity", "--trace", str(full), "--layers", "7")
    assert code == 2 and "--layers 7" in err
