"""Model resolution: local directory, built-in alias, and hub ids fetched lazily (hf_hub_download faked)."""

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import errors as hub_errors

from lazarus_core.models import ModelNotFoundError, UnsafeCheckpointError, open_moe_checkpoint
from lazarus_core.models import builtin


def _response(status: int):
    from types import SimpleNamespace

    return SimpleNamespace(status_code=status, headers={}, url="https://hub.invalid/", text="", request=None)


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download: serves files of a local 'remote' directory into a cache."""

    def __init__(self, remote: Path, cache: Path, repo_id: str = "org/tiny-moe"):
        self.remote, self.cache, self.repo_id = remote, cache, repo_id
        self.calls: list[tuple[str, str | None]] = []
        self.offline = False

    def __call__(self, repo_id, filename, *, revision=None, **kwargs):
        self.calls.append((filename, revision))
        if repo_id != self.repo_id:
            raise hub_errors.RepositoryNotFoundError(f"{repo_id} not found", response=_response(404))
        cached = self.cache / (revision or "main") / filename
        if cached.is_file():
            return str(cached)
        if self.offline:
            raise hub_errors.LocalEntryNotFoundError("offline and not cached")
        source = self.remote / filename
        if not source.is_file():
            raise hub_errors.RemoteEntryNotFoundError(f"{filename} not found", response=_response(404))
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, cached)
        return str(cached)

    def fetched(self) -> list[str]:
        return [f for f, _ in self.calls]


@pytest.fixture
def fake_hub(checkpoint_dir, tmp_path, monkeypatch):
    def make(name: str) -> FakeHub:
        hub = FakeHub(checkpoint_dir(name), tmp_path / "cache")
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
        return hub

    return make


def test_hub_fetches_only_config_index_and_needed_shards(fake_hub):
    hub = fake_hub("olmoe_sharded")
    ckpt = open_moe_checkpoint("org/tiny-moe", revision="abc123")
    assert ckpt.source.kind == "hub" and ckpt.family == "olmoe"
    assert hub.fetched() == ["config.json", "model.safetensors.index.json"]
    assert all(rev == "abc123" for _, rev in hub.calls)
    weights = list(ckpt.iter_experts(1, "down"))
    shards = {f for f in hub.fetched() if f.endswith(".safetensors")}
    index = __import__("json").loads((hub.remote / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {index[f"model.layers.1.mlp.experts.{e}.down_proj.weight"] for e in range(ckpt.num_experts)}
    assert shards == needed and len(shards) < len(set(index.values()))
    local = open_moe_checkpoint(hub.remote)
    for e, w in weights:
        assert w.equal(local.expert_weight(1, "down", e))
    n_calls = len(hub.calls)
    ckpt.expert_weight(1, "down", 0)
    assert len(hub.calls) == n_calls  # each file fetched once


def test_hub_single_file_checkpoint(fake_hub):
    hub = fake_hub("gpt_oss_mxfp4")
    ckpt = open_moe_checkpoint("org/tiny-moe")
    assert ckpt.storage_format(0) == "mxfp4"
    assert "model.safetensors.index.json" in hub.fetched() and "model.safetensors" in hub.fetched()
    assert ckpt.expert_weight(1, "up", 3).shape == (32, 64)


def test_hub_offline_miss_says_so(fake_hub, monkeypatch):
    hub = fake_hub("olmoe_sharded")
    hub.offline = True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"org/tiny-moe@main:config\.json is not in the local Hugging Face cache "
                                                  r"and HF_HUB_OFFLINE=1 forbids downloading it"):
        open_moe_checkpoint("org/tiny-moe")


def test_hub_offline_uses_cache_then_names_missing_shard(fake_hub, monkeypatch):
    hub = fake_hub("olmoe_sharded")
    ckpt = open_moe_checkpoint("org/tiny-moe")
    ckpt.expert_weight(0, "gate", 0)  # online: caches config, index, one shard
    hub.offline = True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = open_moe_checkpoint("org/tiny-moe")
    assert offline.expert_weight(0, "gate", 0).equal(ckpt.expert_weight(0, "gate", 0))
    with pytest.raises(Exception, match=r"model-0000\d-of-0000\d\.safetensors is not in the local Hugging Face cache"):
        for layer in offline.moe_layers:
            for _ in offline.iter_experts(layer, "down"):
                pass


def test_real_hf_hub_download_offline_miss(tmp_path, monkeypatch):
    # The real huggingface_hub code path, offline with an empty cache: no network is touched.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        open_moe_checkpoint("someone/not-cached-moe")


def test_hub_unknown_repo_and_pickle_only_repo(fake_hub, tmp_path, checkpoint_dir):
    hub = fake_hub("olmoe")
    with pytest.raises(ModelNotFoundError, match="'org/other' .*not found on the Hugging Face hub"):
        open_moe_checkpoint("org/other")
    remote = tmp_path / "pickle-remote"
    remote.mkdir()
    shutil.copy(checkpoint_dir("olmoe") / "config.json", remote / "config.json")
    (remote / "pytorch_model.bin").write_bytes(b"not read")
    hub.remote = remote
    hub.cache = tmp_path / "cache2"
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin"):
        open_moe_checkpoint("org/tiny-moe")
    assert "pytorch_model.bin" not in hub.fetched() or (hub.cache / "main" / "pytorch_model.bin").read_bytes() == b"not read"


def test_builtin_alias_resolves_through_resolve_builtin(checkpoint_dir, monkeypatch):
    target = checkpoint_dir("qwen3_moe")
    monkeypatch.setattr(builtin, "resolve_builtin", lambda alias: target if alias == "demo:native" else None,
                        raising=False)
    ckpt = open_moe_checkpoint("demo:native")
    assert ckpt.source.kind == "builtin" and ckpt.family == "qwen3_moe"
    with pytest.raises(ModelNotFoundError, match="'demo:unknown'"):
        open_moe_checkpoint("demo:unknown")


def test_local_directory_wins_and_revision_is_ignored(checkpoint_dir):
    ckpt = open_moe_checkpoint(str(checkpoint_dir("mixtral")), revision="ignored")
    assert ckpt.source.kind == "local" and ckpt.family == "mixtral"
