"""moe-type-analyze on 2 gloo ranks: the report equals one process's (ranks per expert, the call), records the
assignment, splits the experts of a layer when there are fewer layers than ranks, resumes from the layers
saved before a rank failed, and `torchrun ... lazarus introspect moe-expert moe-type-analyze` writes one JSON
from rank 0."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lazarus_core.analysis.expert_structure import analyze_moe_type
from lazarus_core.analysis.moe_type_distributed import moe_type_assignment
from lazarus_core.distributed import RankFailed
from lazarus_core.models import open_moe_checkpoint
from tests.fixtures.distributed import run_ranks, write_olmoe_layers

TIMING = ("seconds", "distributed")


def _comparable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMING}


def _analyze_on_ranks(world, model: str, out: str) -> None:
    from lazarus_core.analysis import moe_type_distributed

    ckpt = open_moe_checkpoint(model)
    for name, layers in (("all", None), ("one", [2])):
        report = analyze_moe_type(ckpt, layers, world=world, model_name="m").to_dict()
        Path(out, f"{name}-rank{world.rank}.json").write_text(json.dumps(report))
    analyze_layer, parts = moe_type_distributed.analyze_layer, Path(out, "parts")

    def only(allowed):
        def analyze(ckpt, layer, **kwargs):
            if layer not in allowed:
                raise RuntimeError(f"simulated crash in layer {layer}")
            return analyze_layer(ckpt, layer, **kwargs)
        return analyze

    moe_type_distributed.analyze_layer = only({0, 1, 2})  # rank 1 fails on layer 3, after saving layer 1
    try:
        analyze_moe_type(ckpt, world=world, model_name="m", parts_dir=str(parts))
    except RankFailed as exc:
        Path(out, f"failed-rank{world.rank}.txt").write_text(str(exc))
    Path(out, f"saved-rank{world.rank}.json").write_text(json.dumps(sorted(p.name for p in parts.iterdir())))
    world.barrier()
    moe_type_distributed.analyze_layer = only({3})       # the rerun loads the saved layers
    report = analyze_moe_type(ckpt, world=world, model_name="m", parts_dir=str(parts)).to_dict()
    Path(out, f"resumed-rank{world.rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_olmoe_layers(tmp_path_factory.mktemp("olmoe4") / "model", 4)


def test_assignment_deals_layers_then_splits_experts():
    assert moe_type_assignment([0, 1, 2, 3], 2, 6) == ({0: [0, 2], 1: [1, 3]}, None)
    layers_of, experts_of = moe_type_assignment([5], 2, 6)
    assert layers_of == {0: [5], 1: [5]} and experts_of == {0: range(0, 3), 1: range(3, 6)}
    layers_of, experts_of = moe_type_assignment([0, 1], 3, 4)
    assert layers_of == {0: [0], 1: [1], 2: [0]} and experts_of == {0: range(0, 2), 1: range(0, 4), 2: range(2, 4)}


@pytest.mark.slow
def test_two_ranks_report_equals_one_process_by_layers_and_by_experts(model, tmp_path):
    ckpt = open_moe_checkpoint(str(model))
    single = {"all": analyze_moe_type(ckpt, model_name="m").to_dict(),
              "one": analyze_moe_type(ckpt, [2], model_name="m").to_dict()}
    run_ranks(_analyze_on_ranks, (str(model), str(tmp_path)), tmp_path / "store")
    for name, expected in single.items():
        got = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
        assert got[0] == got[1]                              # every rank returns the report
        assert _comparable(got[0]) == _comparable(expected)  # ranks per expert, the call, every figure
        assert "distributed" not in expected
    assert json.loads((tmp_path / "all-rank0.json").read_text())["distributed"] == {
        "world_size": 2, "assignment": {"0": [0, 2], "1": [1, 3]}}
    one = json.loads((tmp_path / "one-rank0.json").read_text())["distributed"]
    assert one == {"world_size": 2, "assignment": {"0": [2], "1": [2]}, "experts": {"0": [0, 2], "1": [3, 5]}}
    # a failed rank stops both; the finished layers are kept and the rerun computes only layer 3
    for r in (0, 1):
        assert "rank 1: RuntimeError: simulated crash in layer 3" in (tmp_path / f"failed-rank{r}.txt").read_text()
        assert json.loads((tmp_path / f"saved-rank{r}.json").read_text()) == [
            "layer-00000.json", "layer-00001.json", "layer-00002.json"]
        assert _comparable(json.loads((tmp_path / f"resumed-rank{r}.json").read_text())) == _comparable(single["all"])
    assert not (tmp_path / "parts").exists()


@pytest.mark.slow
def test_torchrun_moe_type_analyze_writes_one_json(model, tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    torchrun, lazarus = shutil.which("torchrun", path=bin_dir), shutil.which("lazarus", path=bin_dir)
    assert torchrun and lazarus, "torchrun and lazarus are installed with the package's dependencies"
    out = tmp_path / "out.json"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", lazarus, "introspect", "moe-expert",
           "moe-type-analyze", "-m", str(model), "--layers", "0,1,3", "--base", "mean", "--no-progress",
           "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("layers agree") == 1            # one report printed, by rank 0
    got = json.loads(out.read_text())
    expected = analyze_moe_type(open_moe_checkpoint(str(model)), [0, 1, 3], model_name=str(model),
                                base_method="mean").to_dict()
    assert _comparable(got) == _comparable(expected)
    assert got["distributed"] == {"world_size": 2, "assignment": {"0": [0, 3], "1": [1]}}
    assert not Path(f"{out}.parts").exists()                  # the resumable layers are removed once joined


def _analyze_two_layers(world, model: str, small: str, out: str) -> None:
    report = analyze_moe_type(open_moe_checkpoint(model), world=world, model_name="m").to_dict()
    Path(out, f"two-rank{world.rank}.json").write_text(json.dumps(report))
    report = analyze_moe_type(open_moe_checkpoint(small), [1], world=world, model_name="m").to_dict()
    Path(out, f"small-rank{world.rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_two_layers_on_three_ranks_split_one_layer_and_equal_one_process(tmp_path):
    # 2 layers, 3 ranks: ranks 0 and 2 share layer 0 (its experts split between them), rank 1 takes layer 1
    model = str(write_olmoe_layers(tmp_path / "model", 2, seed=3, num_experts=5))
    small = str(write_olmoe_layers(tmp_path / "small", 2, seed=6, num_experts=2))  # one layer: 2 experts, 3 ranks
    expected = analyze_moe_type(open_moe_checkpoint(model), model_name="m").to_dict()
    expected_small = analyze_moe_type(open_moe_checkpoint(small), [1], model_name="m").to_dict()
    run_ranks(_analyze_two_layers, (model, small, str(tmp_path)), tmp_path / "store", world_size=3)
    got = [json.loads((tmp_path / f"two-rank{r}.json").read_text()) for r in range(3)]
    assert got[0] == got[1] == got[2]
    assert _comparable(got[0]) == _comparable(expected) and "distributed" not in expected
    assert got[0]["distributed"] == {"world_size": 3, "assignment": {"0": [0], "1": [1], "2": [0]},
                                     "experts": {"0": [0, 2], "1": [0, 4], "2": [3, 4]}}  # first, last
    # more ranks than experts: rank 1 has no share (and no cosine chunks); the report is still one process's
    got = [json.loads((tmp_path / f"small-rank{r}.json").read_text()) for r in range(3)]
    assert got[0] == got[1] == got[2] and _comparable(got[0]) == _comparable(expected_small)
    assert got[0]["distributed"] == {"world_size": 3, "assignment": {"0": [1], "1": [1], "2": [1]},
                                     "experts": {"0": [0, 0], "1": [], "2": [1, 1]}}
