"""moe-overlay-compute / -compress on 2 gloo ranks through the CLI: ranks take layers (or, with one layer, its
experts), write their plans and shards into one --out, rank 0 writes one config; a failing rank stops both and
leaves resumable state, and the rerun reuses every saved plan and shard and ends with the overlay and config of
one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lazarus_core.cli.main import main
from lazarus_core.models import open_moe_checkpoint
from lazarus_core.overlay.compute import compute_spectra
from lazarus_core.overlay.format import CONFIG_NAME
from lazarus_core.overlay.plan_cache import PLAN_DIR
from tests.fixtures.distributed import run_ranks, write_olmoe_layers

POLICY = ["--energy", "0.9", "--no-progress"]


def _fail(*args, **kwargs):
    raise RuntimeError("simulated crash")


def _keep_group(world) -> None:
    """Run ``main`` on this rank as under torchrun, in the group the test set up: main leaves the group when it
    ends (close_world), which would leave the next call of the same process without one."""
    from lazarus_core import distributed

    os.environ.update(WORLD_SIZE=str(world.world_size), RANK=str(world.rank))  # the group is up already
    distributed.close_world = lambda **kwargs: None


def _cli_on_ranks(world, runs: list[tuple[list[str], str]], patch: str) -> None:
    """Each rank runs ``lazarus ARGV`` (as under torchrun) for every (argv, rc file) of ``runs``."""
    from lazarus_core.overlay import compute

    _keep_group(world)
    if patch == "rank 1 cannot write shards" and world.rank == 1:
        compute.write_layer_shard = _fail
    if patch == "no spectra":                 # a rerun must take every spectrum from the plan cache
        compute.projection_spectrum = _fail
    for argv, rc_file in runs:
        Path(f"{rc_file}.{world.rank}").write_text(str(main(argv)))


def _tensors(out: Path) -> dict:
    tensors = {}
    for shard in sorted(out.glob("overlay-layer-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.mark.slow
def test_two_ranks_compress_resumes_after_a_failed_rank_into_the_single_process_overlay(tmp_path, capfd):
    model = str(write_olmoe_layers(tmp_path / "model", 4, seed=1))
    compress = ["introspect", "moe-expert", "moe-overlay-compress", "-m", model, *POLICY]
    compute = ["introspect", "moe-expert", "moe-overlay-compute", "-m", model, *POLICY]
    assert main([*compute, "-o", str(tmp_path / "plan-1.json")]) == 0
    assert main([*compress, "--out", str(tmp_path / "single"), "-o", str(tmp_path / "single.json")]) == 0
    capfd.readouterr()

    out = tmp_path / "ov"
    run_ranks(_cli_on_ranks, ([([*compute, "-o", str(tmp_path / "plan-2.json")], str(tmp_path / "rc-compute")),
                               ([*compress, "--out", str(out)], str(tmp_path / "rc-fail"))],
                              "rank 1 cannot write shards"), tmp_path / "store-a")
    assert [(tmp_path / f"rc-compute.{r}").read_text() for r in (0, 1)] == ["0", "0"]
    plans = [json.loads((tmp_path / f"plan-{n}.json").read_text()) for n in (1, 2)]
    assert plans[1].pop("distributed") == {"world_size": 2, "assignment": {"0": [0, 2], "1": [1, 3]}}
    assert {k: v for k, v in plans[1].items() if k != "seconds"} == {k: v for k, v in plans[0].items() if k != "seconds"}

    assert [(tmp_path / f"rc-fail.{r}").read_text() for r in (0, 1)] == ["2", "2"]  # both ranks stop
    assert capfd.readouterr().err.count("rank 1: RuntimeError: simulated crash") == 2
    assert not (out / CONFIG_NAME).exists()
    assert sorted(p.name for p in out.glob("overlay-layer-*")) == ["overlay-layer-00000.safetensors",
                                                                  "overlay-layer-00002.safetensors"]
    assert len(list((out / PLAN_DIR).glob("plan-layer-*"))) == 4   # the failed rank's plans were saved

    run_ranks(_cli_on_ranks, ([([*compress, "--out", str(out), "-o", str(tmp_path / "rerun.json")],
                                str(tmp_path / "rc-rerun"))], "no spectra"), tmp_path / "store-b")
    assert [(tmp_path / f"rc-rerun.{r}").read_text() for r in (0, 1)] == ["0", "0"]
    rerun = json.loads((tmp_path / "rerun.json").read_text())
    assert (rerun["resumed_layers"], rerun["written_layers"]) == ([0, 2], [1, 3])
    config, single = json.loads((out / CONFIG_NAME).read_text()), json.loads((tmp_path / "single" / CONFIG_NAME).read_text())
    assert config.pop("distributed") == {"world_size": 2, "assignment": {"0": [0, 2], "1": [1, 3]}}
    assert config == single and config["complete"]
    got, want = _tensors(out), _tensors(tmp_path / "single")
    assert sorted(got) == sorted(want) and all(got[k].equal(want[k]) for k in want)


def _spectra_dict(spectra: dict) -> dict:
    return {f"{layer}.{p}": {"singular": sp.singular, "expert_energy": sp.expert_energy, "shape": list(sp.shape),
                             "base_method": sp.base_method, "base": sp.base, "noise_edge": sp.noise_edge}
            for (layer, p), sp in spectra.items()}


def _left(out: str) -> list[str]:
    return sorted(str(f.relative_to(out)) for f in Path(out).rglob("*"))


def _expert_split_on_ranks(world, model: str, tmp: str) -> None:
    """One layer on 2 ranks: the library spectra, then through the CLI a compute, a compress that fails on rank 1
    in its spectra, one that fails on rank 1 while factoring its experts (rank 0 may not compute its spectra
    again), and a rerun that may compute no spectrum."""
    from lazarus_core.analysis import moe_type_distributed
    from lazarus_core.overlay import compute, distributed as overlay_distributed

    _keep_group(world)
    spectra, record = overlay_distributed.distributed_spectra(open_moe_checkpoint(model), [1], world=world)
    if world.is_root:
        torch.save({"spectra": _spectra_dict(spectra), "record": record}, Path(tmp, "spectra.pt"))
    cli = ["introspect", "moe-expert", "-m", model, "--layers", "1", *POLICY]
    out = str(Path(tmp, "ov"))
    Path(tmp, f"rc-compute.{world.rank}").write_text(str(main(
        [cli[0], cli[1], "moe-overlay-compute", *cli[2:], "-o", str(Path(tmp, "plan-2.json"))])))
    share, factor = overlay_distributed.projection_share, compute.low_rank_parts  # the factors: projection_factors
    for run, patched in (("fail-spectra", {1: ((overlay_distributed, "projection_share"),)}),
                         ("fail-factors", {0: ((overlay_distributed, "projection_share"),),
                                           1: ((compute, "low_rank_parts"),)})):
        for module, name in patched.get(world.rank, ()):
            setattr(module, name, _fail)
        Path(tmp, f"rc-{run}.{world.rank}").write_text(str(main([cli[0], cli[1], "moe-overlay-compress", *cli[2:],
                                                                  "--out", out])))
        overlay_distributed.projection_share, compute.low_rank_parts = share, factor
        world.barrier()
        if world.is_root:  # what the failed run left
            Path(tmp, f"left-{run}.json").write_text(json.dumps(_left(out)))
    compute.projection_spectrum = moe_type_distributed.projection_spectrum = _fail  # the rerun: plans from the cache
    Path(tmp, f"rc-rerun.{world.rank}").write_text(str(main([cli[0], cli[1], "moe-overlay-compress", *cli[2:],
                                                              "--out", out, "-o", str(Path(tmp, "rerun.json"))])))


SPLIT = {"world_size": 2, "assignment": {"0": [1], "1": [1]}, "experts": {"0": [0, 2], "1": [3, 5]}}


@pytest.mark.slow
def test_one_layer_on_two_ranks_splits_its_experts_and_equals_one_process(tmp_path, capfd):
    model = str(write_olmoe_layers(tmp_path / "model", 2, seed=2, num_experts=6))
    cli = ["introspect", "moe-expert", "-m", model, "--layers", "1", *POLICY]
    assert main([cli[0], cli[1], "moe-overlay-compute", *cli[2:], "-o", str(tmp_path / "plan-1.json")]) == 0
    assert main([cli[0], cli[1], "moe-overlay-compress", *cli[2:], "--out", str(tmp_path / "single")]) == 0
    single_spectra = _spectra_dict(compute_spectra(open_moe_checkpoint(model), [1]))
    capfd.readouterr()

    run_ranks(_expert_split_on_ranks, (model, str(tmp_path)), tmp_path / "store")
    # the spectra: joined on rank 0 from both ranks' experts, equal to one process's (so the ranks per expert)
    got = torch.load(tmp_path / "spectra.pt")
    assert got["record"] == SPLIT
    assert list(got["spectra"]) == list(single_spectra) and len(single_spectra) == 3
    for key, want in single_spectra.items():
        have = got["spectra"][key]
        assert have["singular"].shape[0] == 6 and have["singular"].equal(want["singular"]), key
        assert have["expert_energy"].equal(want["expert_energy"]) and have["base"] is None
        assert {k: have[k] for k in ("shape", "base_method", "noise_edge")} == \
            {k: want[k] for k in ("shape", "base_method", "noise_edge")}
    # compute: the plan of one process, recording the expert split
    assert [(tmp_path / f"rc-compute.{r}").read_text() for r in (0, 1)] == ["0", "0"]
    plans = [json.loads((tmp_path / f"plan-{n}.json").read_text()) for n in (1, 2)]
    assert plans[1].pop("distributed") == SPLIT
    assert {k: v for k, v in plans[1].items() if k != "seconds"} == {k: v for k, v in plans[0].items() if k != "seconds"}
    # compress with rank 1 failing in its spectra: both stop, rank 0's finished share (with the base) is kept
    out = tmp_path / "ov"
    for run in ("fail-spectra", "fail-factors"):
        assert [(tmp_path / f"rc-{run}.{r}").read_text() for r in (0, 1)] == ["2", "2"]  # both ranks stop
    assert capfd.readouterr().err.count("rank 1: RuntimeError: simulated crash") == 4
    assert json.loads((tmp_path / "left-fail-spectra.json").read_text()) == [
        PLAN_DIR, f"{PLAN_DIR}/share-00001", f"{PLAN_DIR}/share-00001/experts-0-3",
        f"{PLAN_DIR}/share-00001/experts-0-3/plan-layer-00001.safetensors"]
    # then with rank 1 failing on its experts' factors (rank 0 read its share back): the layer's plan is kept
    assert json.loads((tmp_path / "left-fail-factors.json").read_text()) == [
        PLAN_DIR, f"{PLAN_DIR}/plan-layer-00001.safetensors"]
    # the rerun computes no spectrum, writes the layer and ends with one process's overlay
    assert [(tmp_path / f"rc-rerun.{r}").read_text() for r in (0, 1)] == ["0", "0"]
    rerun = json.loads((tmp_path / "rerun.json").read_text())
    assert (rerun["resumed_layers"], rerun["written_layers"], rerun["distributed"]) == ([], [1], SPLIT)
    config, single = json.loads((out / CONFIG_NAME).read_text()), json.loads((tmp_path / "single" / CONFIG_NAME).read_text())
    assert config.pop("distributed") == SPLIT
    assert config == single and config["complete"] and config["moe_layers"] == [1]
    got, want = _tensors(out), _tensors(tmp_path / "single")
    assert sorted(got) == sorted(want) and len(want) == 9 and all(got[k].equal(want[k]) for k in want)
    assert _metadata(out) == _metadata(tmp_path / "single")


def _metadata(out: Path) -> list[dict]:
    metas = []
    for shard in sorted(out.glob("overlay-layer-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            metas.append(f.metadata())
    return metas


@pytest.mark.slow
def test_two_layers_on_three_ranks_compress_into_the_single_process_overlay(tmp_path, capfd):
    # ranks 0 and 2 split layer 0's experts, rank 1 takes layer 1; one overlay directory, one config
    model = str(write_olmoe_layers(tmp_path / "model", 2, seed=4, num_experts=5))
    compress = ["introspect", "moe-expert", "moe-overlay-compress", "-m", model, *POLICY]
    assert main([*compress, "--out", str(tmp_path / "single")]) == 0
    capfd.readouterr()
    out = tmp_path / "ov"
    run_ranks(_cli_on_ranks, ([([*compress, "--out", str(out), "-o", str(tmp_path / "report.json")],
                                str(tmp_path / "rc"))], ""), tmp_path / "store", world_size=3)
    assert [(tmp_path / f"rc.{r}").read_text() for r in range(3)] == ["0", "0", "0"]
    split = {"world_size": 3, "assignment": {"0": [0], "1": [1], "2": [0]},
             "experts": {"0": [0, 2], "1": [0, 4], "2": [3, 4]}}
    assert json.loads((tmp_path / "report.json").read_text())["distributed"] == split
    config, single = json.loads((out / CONFIG_NAME).read_text()), json.loads((tmp_path / "single" / CONFIG_NAME).read_text())
    assert config.pop("distributed") == split
    assert config == single and config["complete"] and config["moe_layers"] == [0, 1]
    got, want = _tensors(out), _tensors(tmp_path / "single")
    assert sorted(got) == sorted(want) and len(want) == 18 and all(got[k].equal(want[k]) for k in want)
    assert _metadata(out) == _metadata(tmp_path / "single")


@pytest.mark.slow
def test_torchrun_compress_of_one_layer_splits_its_experts(tmp_path):
    import shutil
    import subprocess
    import sys

    model = str(write_olmoe_layers(tmp_path / "model", 2, seed=5, num_experts=4))
    args = ["introspect", "moe-expert", "moe-overlay-compress", "-m", model, "--layers", "1", *POLICY]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    bin_dir = str(Path(sys.executable).parent)
    torchrun, lazarus = shutil.which("torchrun", path=bin_dir), shutil.which("lazarus", path=bin_dir)
    assert torchrun and lazarus, "torchrun and lazarus are installed with the package's dependencies"
    out = tmp_path / "ov"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", lazarus, *args, "--out", str(out),
           "-o", str(tmp_path / "report.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = {"world_size": 2, "assignment": {"0": [1], "1": [1]}, "experts": {"0": [0, 1], "1": [2, 3]}}
    assert json.loads((tmp_path / "report.json").read_text())["distributed"] == split
    config, single = json.loads((out / CONFIG_NAME).read_text()), json.loads((tmp_path / "single" / CONFIG_NAME).read_text())
    assert config.pop("distributed") == split and config == single
    got, want = _tensors(out), _tensors(tmp_path / "single")
    assert sorted(got) == sorted(want) and all(got[k].equal(want[k]) for k in want)
    assert not (out / PLAN_DIR).exists() or not any((out / PLAN_DIR).glob("share-*"))  # no share left behind
