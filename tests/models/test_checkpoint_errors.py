"""Bad input: each failure raises a clear error naming the file and tensor at fault, and writes nothing."""

import json
import pickle
import struct
import time
from pathlib import Path

import pytest
import torch

from lazarus_core.models import (
    CheckpointError,
    ModelNotFoundError,
    UnsafeCheckpointError,
    UnsupportedModelError,
    open_moe_checkpoint,
)


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_missing_config_json(checkpoint_copy):
    path = checkpoint_copy("olmoe")
    (path / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        open_moe_checkpoint(path)


def test_shard_named_by_index_but_absent(checkpoint_copy):
    path = checkpoint_copy("olmoe_sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    (path / index[name]).unlink()
    ckpt = open_moe_checkpoint(path)  # lazy: nothing read yet
    ckpt.expert_weight(0, "gate", 0)  # other shards still readable
    with pytest.raises(CheckpointError, match=rf"{index[name]}.*not found.*model\.safetensors\.index\.json"):
        ckpt.expert_weight(1, "down", 3)


def test_tensor_missing_from_index(checkpoint_copy):
    path = checkpoint_copy("olmoe_sharded")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.0.mlp.experts.2.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json.*experts\.2\.up_proj\.weight.*missing"):
        open_moe_checkpoint(path).expert_weight(0, "up", 2)


def test_truncated_file_names_file_and_tensor(checkpoint_copy):
    path = checkpoint_copy("olmoe")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*'.*truncated"):
        open_moe_checkpoint(path)


@pytest.mark.parametrize("corruption", ["huge-header-length", "not-json", "tiny-file"])
def test_corrupt_header(checkpoint_copy, corruption):
    path = checkpoint_copy("olmoe")
    f = path / "model.safetensors"
    data = f.read_bytes()
    if corruption == "huge-header-length":
        f.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif corruption == "not-json":
        f.write_bytes(data[:8] + b"\xff{garbage" + data[18:])
    else:
        f.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|not a safetensors)"):
        open_moe_checkpoint(path)


def test_hostile_shape_is_rejected_before_any_allocation(checkpoint_copy):
    path = checkpoint_copy("olmoe")
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    _rewrite_header(path / "model.safetensors", lambda h: h[name].update(shape=[2**40, 2**40]))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"{name}.*needs \d+"):
        open_moe_checkpoint(path)
    assert time.perf_counter() - start < 5


def test_wrong_shape_for_family(checkpoint_copy):
    path = checkpoint_copy("olmoe")
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    _rewrite_header(path / "model.safetensors", lambda h: h[name].update(shape=h[name]["shape"][::-1]))
    ckpt = open_moe_checkpoint(path)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape \[64, 32\].*\[32, 64\]"):
        ckpt.expert_weight(1, "gate", 2)
    with pytest.raises(CheckpointError, match=name):
        list(ckpt.iter_experts(1, "gate"))


def test_wrong_dtype_for_family(checkpoint_copy):
    path = checkpoint_copy("mixtral")
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    _rewrite_header(path / "model.safetensors", lambda h: h[name].update(dtype="I16"))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has dtype I16"):
        open_moe_checkpoint(path).expert_weight(0, "down", 1)


def test_fp8_scale_shape_mismatch(checkpoint_copy):
    path = checkpoint_copy("deepseek_v3_fp8_b16")
    name = "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"  # [2, 4] for [32, 64] in 16x16 blocks
    _rewrite_header(path / "model.safetensors", lambda h: h[name].update(shape=[4, 2]))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[4, 2\].*\[2, 4\]"):
        open_moe_checkpoint(path).expert_weight(1, "up", 0)


def test_mxfp4_scales_not_matching_blocks(checkpoint_copy):
    path = checkpoint_copy("gpt_oss_mxfp4")
    scales = "model.layers.0.mlp.experts.gate_up_proj_scales"  # [E, 2I, H/32] = [4, 64, 2]
    _rewrite_header(path / "model.safetensors", lambda h: h[scales].update(shape=[4, 32, 4]))
    with pytest.raises(CheckpointError, match=rf"'{scales}'.*does not match its MXFP4 blocks.*gate_up_proj_blocks"):
        open_moe_checkpoint(path).expert_weight(0, "gate", 0)


@pytest.mark.parametrize("layer,expert,match", [
    (5, 0, r"layer 5 is out of range.*MoE layers \[0, 2\]"),
    (1, 0, r"layer 1 is dense.*MoE layers \[0, 2\]"),
    (-1, 0, r"layer -1 is out of range"),
    (0, 6, r"expert 6 out of range.*6 experts"),
    (2, -1, r"expert -1 out of range"),
])
def test_layer_or_expert_out_of_range(checkpoint_dir, layer, expert, match):
    ckpt = open_moe_checkpoint(checkpoint_dir("qwen2_moe"))
    with pytest.raises(IndexError, match=match):
        ckpt.expert_weight(layer, "gate", expert)


def test_unknown_projection(checkpoint_dir):
    with pytest.raises(ValueError, match="projection must be one of"):
        open_moe_checkpoint(checkpoint_dir("olmoe")).expert_weight(0, "w1", 0)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle executed')",))


def test_pickle_only_checkpoint_is_refused_unread(tmp_path, checkpoint_dir):
    (tmp_path / "config.json").write_text((checkpoint_dir("olmoe") / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*never loads pickles"):
        open_moe_checkpoint(tmp_path)


def test_index_pointing_at_pickle_is_refused(checkpoint_copy):
    path = checkpoint_copy("olmoe_sharded")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.gate.weight"] = "pytorch_model-00001.bin"
    index_path.write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpointError, match=r"model\.layers\.0\.mlp\.gate\.weight.*pickle"):
        open_moe_checkpoint(path)


def test_index_cannot_escape_the_directory(checkpoint_copy):
    path = checkpoint_copy("olmoe_sharded")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.gate.weight"] = "../../etc/x.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="invalid file name"):
        open_moe_checkpoint(path)


@pytest.mark.parametrize("config,match", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, r"'llama'.*supported families: olmoe, mixtral"),
    ({"model_type": "my_moe", "num_experts": 8}, r"'my_moe'.*gpt_oss"),
])
def test_unsupported_model(tmp_path, config, match):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=match):
        open_moe_checkpoint(tmp_path)


def test_errors_write_nothing(checkpoint_copy):
    path = checkpoint_copy("gpt_oss_mxfp4")
    _rewrite_header(path / "model.safetensors",
                    lambda h: h["model.layers.1.mlp.experts.down_proj_scales"].update(shape=[4, 32, 2]))
    before = _snapshot(path)
    ckpt = open_moe_checkpoint(path)
    for call in (lambda: ckpt.expert_weight(1, "down", 0), lambda: ckpt.expert_weight(3, "down", 0),
                 lambda: ckpt.expert_weight(1, "down", 9)):
        with pytest.raises((CheckpointError, IndexError)):
            call()
    ckpt.expert_weight(0, "down", 0)
    ckpt.close()
    assert _snapshot(path) == before


def test_not_a_model_at_all(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        open_moe_checkpoint(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(ModelNotFoundError, match="got a file"):
        (tmp_path / "file.txt").write_text("x")
        open_moe_checkpoint(tmp_path / "file.txt")


def test_stream_holds_one_expert_at_a_time(checkpoint_dir):
    import gc
    import weakref

    ckpt = open_moe_checkpoint(checkpoint_dir("gpt_oss_mxfp4"))
    refs = []
    for e, w in ckpt.iter_experts(0, "gate"):
        refs.append(weakref.ref(w))
        del w
        gc.collect()
        assert all(r() is None for r in refs), f"expert {e}: an earlier expert's tensor is still alive"
    assert len(refs) == ckpt.num_experts
