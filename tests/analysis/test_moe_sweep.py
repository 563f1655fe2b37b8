"""moe-type-sweep: one table over many models whose rows equal the single-model results; failures get a row."""

import json

import pytest
import torch

from lazarus_core.analysis.expert_structure import analyze_moe_type
from lazarus_core.analysis.moe_sweep import read_summary, summary_row, sweep_moe_type
from lazarus_core.cli.main import main
from lazarus_core.cli.moe_sweep import COLUMNS, row_cells
from lazarus_core.models import open_moe_checkpoint
from lazarus_core.overlay.sizes import expert_bytes_as_stored

FAMILIES = ("olmoe", "mixtral", "qwen2_moe", "gpt_oss_mxfp4")


def _table_rows(printed: str) -> list[list[str]]:
    """Body rows of a rich table (lines between the heavy header rule and the bottom border)."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    stop = next(i for i, line in enumerate(lines) if line.startswith("└"))
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines[start + 1:stop]]


def _markdown_rows(text: str) -> list[list[str]]:
    table = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table[2:]]


def _without_seconds(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}


def test_sweep_of_four_families_prints_one_table_of_the_single_model_results(checkpoint_dir, tmp_path, capsys):
    models = [str(checkpoint_dir(name)) for name in FAMILIES]
    out, md = tmp_path / "sweep.json", tmp_path / "sweep.md"
    # layer 0 is an MoE layer of all four (the qwen2_moe fixture's layer 1 is dense)
    rc = main(["introspect", "moe-expert", "moe-type-sweep", "-m", models[0], "-m", models[1], *models[2:],
               "--layers", "0", "--no-progress", "-o", str(out), "--markdown", str(md)])
    assert rc == 0
    printed = capsys.readouterr().out
    singles = []
    for model in models:
        ckpt = open_moe_checkpoint(model)
        report = analyze_moe_type(ckpt, [0], model_name=model)
        singles.append((report, read_summary(ckpt, [0])))
    expected = [row_cells(summary_row(report, read)) for report, read in singles]
    assert _table_rows(printed) == expected
    assert _markdown_rows(md.read_text()) == expected and md.read_text().count("| " + COLUMNS[0]) == 1
    sweep = json.loads(out.read_text())
    assert [_without_seconds(m) for m in sweep["models"]] == [_without_seconds(r.to_dict()) for r, _ in singles]
    for row, (report, read) in zip(sweep["rows"], singles):
        want = summary_row(report, read).to_dict()
        assert {k: v for k, v in row.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    calls = {row["model"]: row["moe_type"] for row in sweep["rows"]}
    assert set(calls.values()) <= {"native-moe", "pseudo-moe", "unknown"} and len(calls) == 4
    for model in models:  # the what-was-read line of each model
        assert f"{model}: read 1 MoE layer(s) (0) from " in printed
    single = tmp_path / "single.json"  # and the single-model command's own JSON
    assert main(["introspect", "moe-expert", "moe-type-analyze", "-m", models[0], "--layers", "0", "--no-progress",
                 "-o", str(single)]) == 0
    assert _without_seconds(json.loads(single.read_text())) == _without_seconds(sweep["models"][0])


def test_a_failing_model_gets_a_row_and_the_others_still_run(checkpoint_dir, tmp_path, capsys):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}))
    good = str(checkpoint_dir("olmoe"))
    missing = str(tmp_path / "nope")
    out = tmp_path / "sweep.json"
    assert main(["introspect", "moe-expert", "moe-type-sweep", missing, str(dense), good, "--no-progress",
                 "-o", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == [missing, str(dense), good]
    assert "no such directory" in rows[0]["error"] and rows[0]["moe_type"] is None
    assert "llama" in rows[1]["error"]
    assert rows[2]["error"] is None and rows[2]["moe_type"] == "native-moe"
    printed = capsys.readouterr().out
    assert [r[2] for r in _table_rows(printed)] == ["failed", "failed", "native-moe"]
    assert f"{missing}: failed: " in printed


def test_a_layer_missing_from_one_model_fails_only_that_model(checkpoint_dir):
    # --layers 1: a MoE layer of olmoe, dense in the qwen2_moe fixture (its MoE layers are 0 and 2)
    sweep = sweep_moe_type([str(checkpoint_dir("qwen2_moe")), str(checkpoint_dir("olmoe"))], "1")
    assert "not MoE layers" in sweep.rows[0].error and sweep.reports[0] is None
    assert sweep.rows[1].error is None and [layer.layer for layer in sweep.reports[1].layers] == [1]


def test_read_summary_counts_the_shards_and_expert_bytes_of_the_layers(checkpoint_dir):
    ckpt = open_moe_checkpoint(checkpoint_dir("olmoe_sharded"))
    report = analyze_moe_type(ckpt, [1])
    read = read_summary(ckpt, [1])
    wmap = json.loads((checkpoint_dir("olmoe_sharded") / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {f for name, f in wmap.items() if name.startswith("model.layers.1.mlp.experts.")}
    assert read.layers == [1] and read.weight_files_total == len(set(wmap.values()))
    assert set(read.files) >= shards | {"config.json"}
    assert read.expert_bytes == expert_bytes_as_stored(ckpt)[1]
    assert summary_row(report, read).read is read


def test_sweep_needs_a_model_and_valid_options(checkpoint_dir, capsys):
    with pytest.raises(ValueError, match="no models"):
        sweep_moe_type([])
    bad = [(["--base", "bogus"], "--base must be one of")]
    if not torch.cuda.is_available():
        bad.append((["--device", "cuda"], "no CUDA device"))
    for option, message in bad:  # a bad option is the command's error, not a failed row per model
        for extra in ([], ["--estimate"]):
            argv = ["introspect", "moe-expert", "moe-type-sweep", str(checkpoint_dir("olmoe")), *option, *extra]
            assert main(argv) == 2
            assert message in capsys.readouterr().err
