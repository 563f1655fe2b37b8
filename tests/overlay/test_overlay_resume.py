"""Resume covers the whole job: a changed source is refused (no stale shards), per-layer plans (spectra and
bases) are saved in the output directory and reused, writing reuses the planning base, and ``--layers`` runs
into one directory merge into one config."""

from __future__ import annotations

import json

import pytest
import torch

from lazarus_core.analysis.expert_structure import parse_layers
from lazarus_core.cli.capture import parse_layers as parse_capture_layers
from lazarus_core.cli.main import main
from lazarus_core.models import open_moe_checkpoint
from lazarus_core.overlay import compute, make_policy, plan_overlay, read_config, read_layer, write_overlay
from lazarus_core.overlay.compute import compute_spectra
from lazarus_core.overlay.fingerprint import OverlaySourceMismatch
from lazarus_core.overlay.plan_cache import PLAN_DIR, plan_path
from tests.overlay.source_edits import rewrite_experts


def _forbid(monkeypatch, name: str) -> None:
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called: the saved plan should have been reused")

    monkeypatch.setattr(compute, name, fail)


def test_resume_refuses_shards_of_a_changed_source(checkpoint_copy, tmp_path):
    # Before fingerprints a resume kept every shard after the source files changed under the same name.
    src = checkpoint_copy("olmoe")
    ckpt = open_moe_checkpoint(str(src))
    plan = plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=2), dtype="fp32")
    write_overlay(ckpt, tmp_path / "ov", plan, model=str(src))
    rewrite_experts(src, only="model.layers.1.mlp.experts.4.gate_proj.weight")
    changed = open_moe_checkpoint(str(src))
    with pytest.raises(OverlaySourceMismatch, match=r"experts\.4\.gate_proj.*--no-resume"):
        write_overlay(changed, tmp_path / "ov", plan, model=str(src))
    fresh = write_overlay(changed, tmp_path / "ov", plan, model=str(src), resume=False)
    assert fresh["written_layers"] == list(ckpt.moe_layers) and fresh["resumed_layers"] == []


def test_plans_are_saved_and_reused_and_writing_reuses_the_base(checkpoint_dir, tmp_path, monkeypatch):
    ckpt = open_moe_checkpoint(str(checkpoint_dir("gpt_oss_mxfp4")))
    layers, cache = list(ckpt.moe_layers), tmp_path / "ov" / PLAN_DIR
    first = compute_spectra(ckpt, layers, cache_dir=cache)
    assert all(plan_path(cache, layer).is_file() for layer in layers)
    assert all(sp.base is None for sp in first.values())  # bases live on disk, not in memory
    reference = {k: compute_spectra(ckpt, [k[0]], keep_base=True)[k] for k in [(layers[0], "gate")]}

    _forbid(monkeypatch, "projection_spectrum")
    again = compute_spectra(ckpt, layers, cache_dir=cache, keep_base=True)
    for key, sp in first.items():
        torch.testing.assert_close(again[key].singular, sp.singular, rtol=0, atol=0)
        torch.testing.assert_close(again[key].noise_edge, sp.noise_edge, rtol=0, atol=0)
    key = (layers[0], "gate")
    torch.testing.assert_close(again[key].base, reference[key].base, rtol=0, atol=0)

    _forbid(monkeypatch, "overlay_base")  # writing takes the planning base from the plan cache
    plan = plan_overlay(ckpt, layers, make_policy(rank=3), dtype="fp32", spectra=first)
    write_overlay(ckpt, tmp_path / "ov", plan, model="m", spectra=first)
    f = read_layer(tmp_path / "ov", read_config(tmp_path / "ov"), layers[0])
    torch.testing.assert_close(f.base["gate"], reference[key].base, rtol=0, atol=0)


def test_a_changed_source_or_base_method_does_not_reuse_a_plan(checkpoint_copy, tmp_path, monkeypatch):
    src = checkpoint_copy("olmoe")
    cache = tmp_path / PLAN_DIR
    compute_spectra(open_moe_checkpoint(str(src)), [0], cache_dir=cache, base_method="mean")
    calls = []
    original = compute.projection_spectrum
    monkeypatch.setattr(compute, "projection_spectrum", lambda *a, **k: calls.append(k) or original(*a, **k))
    compute_spectra(open_moe_checkpoint(str(src)), [0], cache_dir=cache, base_method="mean")
    assert calls == []
    compute_spectra(open_moe_checkpoint(str(src)), [0], cache_dir=cache, base_method="refined")
    assert len(calls) == 3  # another base: recomputed
    rewrite_experts(src, only="model.layers.0.mlp.experts.0.down_proj.weight")
    fresh = compute_spectra(open_moe_checkpoint(str(src)), [0], cache_dir=cache, base_method="refined")
    assert len(calls) == 6  # another source: recomputed
    reference = compute_spectra(open_moe_checkpoint(str(src)), [0], base_method="refined")
    torch.testing.assert_close(fresh[(0, "down")].singular, reference[(0, "down")].singular)


def test_layers_runs_into_one_directory_merge_into_one_config(checkpoint_dir, tmp_path):
    src = checkpoint_dir("olmoe")
    ckpt = open_moe_checkpoint(str(src))
    out = tmp_path / "ov"
    run = lambda layers, rank: write_overlay(  # noqa: E731
        ckpt, out, plan_overlay(ckpt, layers, make_policy(rank=rank), dtype="bf16"), model=str(src))
    assert run([0], 2)["config"]["complete"]
    second = run([1], 3)
    config = read_config(out)
    assert config["moe_layers"] == [0, 1] and config["complete"] and second["written_layers"] == [1]
    assert {k: v["projections"]["up"]["rank"] for k, v in config["layers"].items()} == {"0": 2, "1": 3}
    assert config["source"]["fingerprint"]["layers"] == [0, 1]
    both = plan_overlay(ckpt, [0, 1], make_policy(gate_rank=2, up_rank=2, down_rank=2), dtype="bf16").bytes
    one = plan_overlay(ckpt, [1], make_policy(rank=3), dtype="bf16").bytes
    per_layer_0 = both.overlay_expert_bytes / 2
    assert config["bytes"]["overlay_expert_bytes"] == per_layer_0 + one.overlay_expert_bytes  # bytes of the union
    assert config["bytes"]["original_expert_bytes"] == both.original_expert_bytes
    for layer in (0, 1):
        read_layer(out, config, layer)  # every merged layer reads back
    (out / config["layers"]["1"]["shard"]).unlink()  # layer 1 lost (an interrupted run of it)
    third = run([0], 2)
    assert third["missing_layers"] == [1] and not read_config(out)["complete"]  # complete only when all are written


def test_cli_layers_runs_merge_and_the_repeated_layer_is_one(checkpoint_dir, tmp_path):
    assert parse_layers("1,1", [0, 1]) == [1] and parse_layers("1,0,1", [0, 1]) == [1, 0]
    assert parse_capture_layers(["1,1", "1"]) == [1]
    src, out = str(checkpoint_dir("olmoe")), tmp_path / "ov"
    run = lambda *a: main(["introspect", "moe-expert", "moe-overlay-compress", "-m", src, "--rank", "2",  # noqa: E731
                           "--out", str(out), "--no-progress", *a])
    assert run("--layers", "0,0") == 0
    assert read_config(out)["moe_layers"] == [0]
    assert run("--layers", "1", "-o", str(tmp_path / "p.json")) == 0
    config = read_config(out)
    assert config["moe_layers"] == [0, 1] and config["complete"]
    press = json.loads((tmp_path / "p.json").read_text())
    assert press["overlay_layers"] == [0, 1] and press["written_layers"] == [1] and press["missing_layers"] == []
    assert sorted(p.name for p in (out / PLAN_DIR).iterdir()) == ["plan-layer-00000.safetensors",
                                                                  "plan-layer-00001.safetensors"]
