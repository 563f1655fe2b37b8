"""moe-overlay-compute / -compress on 2 gloo ranks through the CLI: ranks take layers, write their plans and
shards into one --out, rank 0 writes one config; a failing rank stops both and leaves resumable state, and
the rerun reuses every saved plan and shard and ends with the overlay and config of one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from lazarus_core.cli.main import main
from lazarus_core.overlay.format import CONFIG_NAME
from lazarus_core.overlay.plan_cache import PLAN_DIR
from tests.fixtures.distributed import run_ranks, write_olmoe_layers

POLICY = ["--energy", "0.9", "--no-progress"]


def _fail(*args, **kwargs):
    raise RuntimeError("simulated crash")


def _cli_on_ranks(world, runs: list[tuple[list[str], str]], patch: str) -> None:
    """Each rank runs ``lazarus ARGV`` (as under torchrun) for every (argv, rc file) of ``runs``."""
    from lazarus_core.overlay import compute

    os.environ.update(WORLD_SIZE=str(world.world_size), RANK=str(world.rank))  # the group is up already
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
