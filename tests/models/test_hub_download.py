"""`-m org/name` through the real huggingface_hub against a hub served on 127.0.0.1 by the test itself: only
config, index and the needed shards are fetched; offline reruns come from the cache; each failure is one line
and leaves the cache usable."""

import json
import os
import subprocess
import sys
import types

import pytest

from lazarus_core.cli.main import main
from tests.fixtures.hub_server import API, HubServer, point_hub_at, write_three_shard_checkpoint

REPO = "org/tiny-moe"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """The 3-shard fixture and the shards holding layer 1's expert tensors."""
    directory = write_three_shard_checkpoint(tmp_path_factory.mktemp("remote") / "tiny-moe")
    wmap = json.loads((directory / INDEX).read_text())["weight_map"]
    layer1 = sorted({f for name, f in wmap.items() if name.startswith("model.layers.1.mlp.experts.")})
    assert 0 < len(layer1) < len(set(wmap.values())) == 3
    return directory, layer1


@pytest.fixture
def hub(remote):
    with HubServer({REPO: remote[0]}) as server:
        yield server


def _without_seconds(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("seconds", "model")}


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return subprocess.run([sys.executable, "-m", "lazarus_core.cli.main", "introspect", "moe-expert", *args],
                          env={**clean, **env}, capture_output=True, text=True, timeout=300)


def test_layer_1_fetches_config_index_and_its_shard_then_offline_from_cache(hub, remote, tmp_path, monkeypatch,
                                                                           capsys):
    directory, layer1 = remote
    home = tmp_path / "hf_home"
    args = ("moe-type-analyze", "-m", REPO, "--layers", "1", "--no-progress", "-o")
    run = _cli(hub.environment(home), *args, str(tmp_path / "online.json"))
    assert run.returncode == 0, run.stderr
    wanted = ["config.json", INDEX, *layer1]
    assert hub.files_requested("GET") == wanted  # each once, nothing else
    assert sorted(set(hub.files_requested("HEAD"))) == sorted(wanted)
    assert {r.filename for r in hub.requests} == set(wanted)
    online = json.loads((tmp_path / "online.json").read_text())
    assert [layer["layer"] for layer in online["layers"]] == [1]

    local = tmp_path / "local.json"
    assert main(["introspect", "moe-expert", "moe-type-analyze", "-m", str(directory), "--layers", "1",
                 "--no-progress", "-o", str(local)]) == 0
    assert _without_seconds(json.loads(local.read_text())) == _without_seconds(online)

    # Rerun with HF_HUB_OFFLINE=1 on the same cache (in this process: one subprocess start is enough).
    point_hub_at(hub, home, monkeypatch, offline=True)
    n_requests = len(hub.requests)
    assert main(["introspect", "moe-expert", *args, str(tmp_path / "offline.json")]) == 0
    assert len(hub.requests) == n_requests  # the cache only
    offline = json.loads((tmp_path / "offline.json").read_text())
    assert _without_seconds(offline) == _without_seconds(online)
    capsys.readouterr()
    assert main(["introspect", "moe-expert", "moe-type-analyze", "-m", REPO, "--layers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it" in err
    assert len(hub.requests) == n_requests


FAULTS = {
    "missing": "no such file in the repository",
    "http404": "the hub answered HTTP 404",
    "truncate": "download failed (Consistency check failed: file should be of size",
    "interrupt": "download interrupted (RemoteProtocolError",
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failed_download_is_one_line_and_a_rerun_succeeds(fault, hub, remote, tmp_path, monkeypatch, capsys):
    import huggingface_hub.file_download as file_download

    _, layer1 = remote
    home = tmp_path / "hf_home"
    point_hub_at(hub, home, monkeypatch)
    # huggingface_hub waits 1 s before each of its 5 attempts to resume an interrupted transfer; skip the waits.
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    shard = layer1[0]
    hub.faults[shard] = fault
    argv = ["introspect", "moe-expert", "moe-type-analyze", "-m", REPO, "--layers", "1", "--no-progress"]
    assert main([*argv, "-o", str(tmp_path / "failed.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"lazarus: error: {REPO}@main:{shard}: ") and FAULTS[fault] in err
    assert not (tmp_path / "failed.json").exists()
    assert not list(home.rglob("*.incomplete"))  # nothing partial left behind
    if fault == "interrupt":  # huggingface_hub retried the broken transfer before giving up
        assert hub.files_requested("GET").count(shard) > 1

    hub.faults.clear()  # the server is fixed
    assert main([*argv, "-o", str(tmp_path / "fixed.json")]) == 0
    fixed = json.loads((tmp_path / "fixed.json").read_text())
    assert [layer["layer"] for layer in fixed["layers"]] == [1]
    assert hub.files_requested("GET").count(shard) >= 1 and hub.files_requested("GET").count("config.json") == 1


def test_estimate_fetches_only_config_and_index(hub, remote, tmp_path, monkeypatch, capsys):
    directory, layer1 = remote
    point_hub_at(hub, tmp_path / "hf_home", monkeypatch)
    out = tmp_path / "estimate.json"
    argv = ["introspect", "moe-expert", "moe-type-analyze", "-m", REPO, "--layers", "1", "--estimate", "-o", str(out)]
    assert main(argv) == 0
    assert hub.files_requested("GET") == ["config.json", INDEX]  # and the file listing, for the sizes
    assert [r.filename for r in hub.requests if r.filename is None and r.method == "GET"] == [None]
    estimate = json.loads(out.read_text())["estimate"]["rows"][0]["estimate"]
    wanted = ["config.json", INDEX, *layer1]
    assert [f["name"] for f in estimate["files"]] == wanted
    sizes = {f: (directory / f).stat().st_size for f in wanted}
    assert estimate["bytes_needed"] == sum(sizes.values())
    assert estimate["bytes_to_download"] == sum(sizes[f] for f in layer1)  # config and index are cached now
    assert estimate["weight_files_total"] == 3
    printed = capsys.readouterr().out
    assert "estimate" in printed and "org/tiny-moe" in printed

    sweep = tmp_path / "sweep.json"  # the sweep reads a hub model the same way, and says what it read
    assert main(["introspect", "moe-expert", "moe-type-sweep", REPO, "--layers", "1", "--no-progress",
                 "-o", str(sweep)]) == 0
    read = json.loads(sweep.read_text())["rows"][0]["read"]
    assert list(read["files"]) == wanted and read["weight_files_read"] == len(layer1)
    assert read["weight_files_total"] == 3 and read["weight_file_bytes"] == sum(sizes[f] for f in layer1)
    assert f"{REPO}: read 1 MoE layer(s) (1) from {len(layer1)} of 3 weight file(s)" in capsys.readouterr().out
    assert main(argv) == 0  # after the run everything is cached
    assert json.loads(out.read_text())["estimate"]["bytes_to_download"] == 0


def test_estimate_says_unknown_when_sizes_cannot_be_had(hub, remote, tmp_path, monkeypatch, capsys):
    from lazarus_core.analysis.estimate import estimate_moe_type

    _, layer1 = remote
    home = tmp_path / "hf_home"
    point_hub_at(hub, home, monkeypatch)
    hub.faults[API] = "http500"  # no file listing: the shard's size is unknown, not guessed
    online = estimate_moe_type(REPO, "1", repeats=1)
    assert [f.name for f in online.weight_files] == layer1 and online.weight_files[0].size is None
    assert online.bytes_needed is None and online.bytes_to_download is None

    point_hub_at(hub, home, monkeypatch, offline=True)  # config and index are cached now
    n_requests = len(hub.requests)
    offline = estimate_moe_type(REPO, "1", repeats=1)
    assert [f.name for f in offline.files] == [f.name for f in online.files] and offline.bytes_needed is None
    assert len(hub.requests) == n_requests

    point_hub_at(hub, tmp_path / "empty_home", monkeypatch, offline=True)
    assert main(["introspect", "moe-expert", "moe-type-analyze", "-m", REPO, "--estimate"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "HF_HUB_OFFLINE=1 forbids downloading it" in err
