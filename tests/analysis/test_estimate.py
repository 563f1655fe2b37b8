"""--estimate: files and bytes from config and index only, time from the measured per-expert cost, memory."""

import json

import pytest
import torch

from lazarus_core.analysis import estimate as est
from lazarus_core.analysis.estimate import (estimate_moe_type, expert_bytes_from_config, expert_seconds,
                                            working_memory_bytes)
from lazarus_core.analysis.expert_structure import analyze_moe_type
from lazarus_core.cli.main import main
from lazarus_core.models import open_moe_checkpoint
from lazarus_core.overlay.sizes import expert_bytes_as_stored


@pytest.mark.parametrize("name", ["olmoe", "olmoe_fp32", "gpt_oss", "gpt_oss_mxfp4", "deepseek_v3_fp8",
                                  "deepseek_v3_fp8_b16", "qwen2_moe", "dbrx"])
def test_expert_bytes_from_config_equal_the_stored_tensors(checkpoint_dir, name):
    ckpt = open_moe_checkpoint(checkpoint_dir(name))
    stored = expert_bytes_as_stored(ckpt)
    layers = list(ckpt.moe_layers)
    assert expert_bytes_from_config(ckpt.spec, ckpt.config, len(layers)) == sum(stored[layer] for layer in layers)


def test_needed_files_are_the_files_the_analysis_opens(checkpoint_dir):
    path = checkpoint_dir("olmoe_sharded")
    estimate = estimate_moe_type(str(path), "1", repeats=1)
    ckpt = open_moe_checkpoint(path)
    analyze_moe_type(ckpt, [1])
    opened = ckpt.source.files_opened()
    assert {f.name: f.size for f in estimate.files} == opened
    assert [f.name for f in estimate.files[:2]] == ["config.json", "model.safetensors.index.json"]
    assert estimate.bytes_needed == sum(opened.values()) and estimate.bytes_to_download == 0
    wmap = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert estimate.weight_files_total == len(set(wmap.values())) > len(estimate.weight_files)


def test_time_and_memory_scale_with_experts_layers_and_processes(checkpoint_dir, monkeypatch):
    calls = []

    def measured(shape, **kwargs):  # a stand-in per-expert cost, so the arithmetic is exact
        calls.append((tuple(shape), kwargs["base_method"]))
        return 0.25

    monkeypatch.setattr(est, "expert_seconds", measured)
    path = str(checkpoint_dir("olmoe"))  # E=6, 2 MoE layers, gate/up [32, 64], down [64, 32], bf16
    one = estimate_moe_type(path, "1")
    assert calls == [((32, 64), "refined")] and one.seconds_per_expert == {"gate": 0.25, "up": 0.25, "down": 0.25}
    assert one.expert_steps == 6 * 3 and one.seconds == pytest.approx(6 * 3 * 0.25)
    both = estimate_moe_type(path, None, nproc=4, base_method="mean")
    assert calls[-1] == ((32, 64), "mean")
    assert both.layers == [0, 1] and both.seconds == pytest.approx(2 * 6 * 3 * 0.25 / 4)
    assert both.peak_memory_bytes == one.peak_memory_bytes == working_memory_bytes((32, 64), 2.0)
    assert both.peak_memory_bytes_total == 4 * both.peak_memory_bytes
    assert one.storage == "bf16" and one.expert_bytes == 6 * 3 * 32 * 64 * 2


def test_expert_seconds_times_the_projection_pass_and_checks_its_inputs():
    t = expert_seconds((24, 40), repeats=1)
    assert 0.0 < t < 60.0 and expert_seconds((24, 40), repeats=1) == t  # remembered per shape
    assert expert_seconds((24, 40), repeats=1, base_method="mean") > 0.0
    with pytest.raises(ValueError, match="repeats"):
        expert_seconds((24, 40), repeats=0)
    with pytest.raises(ValueError, match="--base"):
        expert_seconds((24, 40), base_method="bogus")
    if not torch.cuda.is_available():  # the device path's own cost needs a device; refused without one
        with pytest.raises(ValueError, match="no CUDA device"):
            expert_seconds((24, 40), device="cuda")


def test_bad_inputs_are_one_clear_error(checkpoint_dir, tmp_path, capsys):
    path = str(checkpoint_dir("olmoe"))
    with pytest.raises(ValueError, match="--nproc"):
        estimate_moe_type(path, nproc=0)
    with pytest.raises(ValueError, match="not MoE layers"):
        estimate_moe_type(path, "7")
    rc = main(["introspect", "moe-expert", "moe-type-analyze", "-m", str(tmp_path / "nope"), "--estimate"])
    assert rc == 2 and "no such directory" in capsys.readouterr().err


def test_cli_estimate_prints_and_writes_without_running_the_analysis(checkpoint_dir, tmp_path, monkeypatch, capsys):
    import lazarus_core.analysis.expert_structure as structure
    import lazarus_core.analysis.moe_sweep as sweep

    def refuse(*args, **kwargs):
        raise AssertionError("--estimate ran the analysis")

    monkeypatch.setattr(structure, "analyze_moe_type", refuse)
    monkeypatch.setattr(sweep, "analyze_moe_type", refuse)
    models = [str(checkpoint_dir("olmoe_sharded")), str(checkpoint_dir("gpt_oss_mxfp4")), str(tmp_path / "nope")]
    out, md = tmp_path / "e.json", tmp_path / "e.md"
    rc = main(["introspect", "moe-expert", "moe-type-sweep", *models, "--layers", "1", "--estimate", "--nproc", "2",
               "--repeats", "1", "-o", str(out), "--markdown", str(md)])
    assert rc == 0
    result = json.loads(out.read_text())["estimate"]
    assert [r["model"] for r in result["rows"]] == models and result["nproc"] == 2
    assert result["rows"][2]["estimate"] is None and "no such directory" in result["rows"][2]["error"]
    done = [r["estimate"] for r in result["rows"][:2]]
    assert result["seconds"] == pytest.approx(sum(e["seconds"] for e in done))
    assert result["bytes_needed"] == sum(e["bytes_needed"] for e in done)
    assert done[1]["storage"] == "mxfp4" and [f["name"] for f in done[1]["files"]] == ["config.json",
                                                                                      "model.safetensors"]
    printed = capsys.readouterr().out
    assert "2 process(es)" in printed and f"{models[2]}: failed" in printed
    assert md.read_text().count("\n| ") >= 4  # header, rule, three rows

    single = tmp_path / "single.json"
    assert main(["introspect", "moe-expert", "moe-type-analyze", "-m", models[0], "--layer", "1", "--estimate",
                 "--repeats", "1", "-o", str(single)]) == 0
    row = json.loads(single.read_text())["estimate"]["rows"][0]["estimate"]
    assert row["layers"] == [1] and row["files"] == done[0]["files"]

