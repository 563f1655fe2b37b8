"""`lazarus merge`: moe-type-analyze parts of disjoint --layers join into the report of one run over all those
layers; overlapping layers and parts of another model are refused with the parts named."""

from __future__ import annotations

import json

import pytest

from lazarus_core.analysis.moe_type_merge import merge_moe_type_reports
from lazarus_core.cli.main import main
from tests.fixtures.distributed import write_olmoe_layers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """moe-type-analyze -o of layers 0,1 / layer 3 / layer 2 / 0-3 (one run) of a 4-layer model."""
    tmp = tmp_path_factory.mktemp("merge")
    model = write_olmoe_layers(tmp / "model", 4, seed=3)
    out = {}
    for name, spec in (("a", "0,1"), ("b", "3"), ("c", "2"), ("whole", "0,1,2,3")):
        out[name] = tmp / f"{name}.json"
        argv = ["introspect", "moe-expert", "moe-type-analyze", "-m", str(model), "--layers", spec, "--base", "mean",
                "--no-progress", "-o", str(out[name])]
        assert main(argv) == 0
    return out


def _drop_seconds(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}


def test_merge_equals_one_run_over_all_layers(runs, tmp_path, capsys):
    merged = tmp_path / "merged.json"
    assert main(["merge", str(runs["b"]), str(runs["a"]), str(runs["c"]), "-o", str(merged)]) == 0  # any order
    got, whole = json.loads(merged.read_text()), json.loads(runs["whole"].read_text())
    assert [layer["layer"] for layer in got["layers"]] == [0, 1, 2, 3]
    assert _drop_seconds(got) == _drop_seconds(whole)        # call, confidence, agreement, compression, layers
    assert "4 layers from 3 parts" in capsys.readouterr().out


def test_merge_refuses_overlapping_layers_and_other_models(runs, tmp_path, capsys):
    assert main(["merge", str(runs["a"]), str(runs["whole"]), "-o", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert f"layer 0 is in both {runs['a']} and {runs['whole']}" in err and not (tmp_path / "m.json").exists()
    a, b = json.loads(runs["a"].read_text()), json.loads(runs["b"].read_text())
    with pytest.raises(ValueError, match=r"second and first differ in num_experts"):
        merge_moe_type_reports([a, {**b, "num_experts": 8}], ["first", "second"])
    with pytest.raises(ValueError, match=r"second and first differ in compression base"):
        merge_moe_type_reports([a, {**b, "compression": {**b["compression"], "base": "refined"}}], ["first", "second"])
