"""`lazarus introspect moe-expert moe-type-analyze / moe-type-compare` end to end on generated checkpoints."""

import json

import pytest

from lazarus_core.cli.main import main


def test_analyze_json_plot_and_visualize(checkpoint_dir, tmp_path, capsys):
    out, plot = tmp_path / "r.json", tmp_path / "fig.png"
    rc = main(["introspect", "moe-expert", "moe-type-analyze", "-m", str(checkpoint_dir("gpt_oss_mxfp4")),
               "--layers", "all", "--visualize", "--plot", str(plot), "-o", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["family"] == "gpt_oss" and report["num_experts"] == 4 and report["moe_type"] == "native-moe"
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    for layer in report["layers"]:
        assert set(layer["cosine_similarity"]) >= {"mean", "std"}
        for name in ("gate", "up", "down"):
            p = layer["projections"][name]
            assert p["shape"] == ([32, 64] if name != "down" else [64, 32]) and p["max_rank"] == 32
            assert len(p["experts_rank_95"]) == 4 and p["effective_rank_95"] == sum(p["experts_rank_95"]) / 4
            assert p["noise_floor"] is not None and p["bias"] is not None  # MXFP4 source, GPT-OSS biases
    assert plot.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "native-moe" in printed and "cosine heatmap" in printed and "MDS" in printed


def test_single_layer_and_compare(checkpoint_dir, tmp_path):
    out = tmp_path / "c.json"
    rc = main(["introspect", "moe-expert", "moe-type-compare", "-m", str(checkpoint_dir("qwen2_moe")),
               "-c", str(checkpoint_dir("olmoe_fp32")), "--layer", "0", "-o", str(out), "--no-progress"])
    assert rc == 0
    models = json.loads(out.read_text())["models"]
    assert [m["family"] for m in models] == ["qwen2_moe", "olmoe"]
    assert all(len(m["layers"]) == 1 and m["layers"][0]["layer"] == 0 for m in models)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--layers", "1"], "not MoE layers"),  # qwen2_moe fixture: layer 1 is dense
        (["--layers", "x"], "comma-separated"),
        (["--plot", "fig.txt"], "--plot must end"),
    ],
)
def test_bad_arguments(checkpoint_dir, tmp_path, capsys, argv, match):
    rc = main(["introspect", "moe-expert", "moe-type-analyze", "-m", str(checkpoint_dir("qwen2_moe")),
               "--no-progress", *[a if a != "fig.txt" else str(tmp_path / a) for a in argv]])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    rc = main(["introspect", "moe-expert", "moe-type-analyze", "-m", str(tmp_path / "nope"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "lazarus: error:" in err and "no such directory" in err and "Traceback" not in err


def test_moe_expert_without_action_means_explore():
    from lazarus_core.cli.introspect import with_default_action

    assert with_default_action(["introspect", "moe-expert", "-m", "x", "-p", "hi"]) == \
        ["introspect", "moe-expert", "explore", "-m", "x", "-p", "hi"]
    assert with_default_action(["introspect", "moe-expert", "moe-type-analyze", "-m", "x"])[2] == "moe-type-analyze"
    assert with_default_action(["introspect", "moe-expert", "--help"]) == ["introspect", "moe-expert", "--help"]
