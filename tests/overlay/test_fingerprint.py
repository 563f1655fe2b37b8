"""An overlay is bound to its source: the fingerprint (name, dtype, shape, sha256 of sampled or all bytes of every
expert tensor), and load_model / verify refusing another model, naming the first differing tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lazarus_core.models import open_moe_checkpoint
from lazarus_core.models.safetensors_file import SafetensorsFile
from lazarus_core.overlay import load_model, make_policy, plan_overlay, write_overlay
from lazarus_core.overlay.fingerprint import (SAMPLE_CHUNK_BYTES, SAMPLE_CHUNKS, OverlaySourceMismatch, _tensor_digest,
                                              check_source, expert_tensor_names, source_fingerprint, source_mismatch)
from lazarus_core.overlay.format import CONFIG_NAME, read_config
from lazarus_core.overlay.verify import verify_overlay
from tests.overlay.source_edits import rewrite_experts


def _compress(src, out, rank: int = 2):
    ckpt = open_moe_checkpoint(str(src))
    write_overlay(ckpt, out, plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=rank), dtype="fp32"),
                  model=str(src))
    return ckpt


@pytest.mark.parametrize("name", ["olmoe", "gpt_oss_mxfp4", "deepseek_v3_fp8_b16", "olmoe_sharded"])
def test_fingerprint_covers_every_stored_expert_tensor(checkpoint_dir, name):
    ckpt = open_moe_checkpoint(str(checkpoint_dir(name)))
    layer = ckpt.moe_layers[-1]
    fp = source_fingerprint(ckpt, [layer])
    names = list(fp["tensors"])
    assert names == expert_tensor_names(ckpt, layer) and fp["layers"] == [layer] and not fp["full_hash"]
    per_expert = 3 * ckpt.num_experts
    expected = {"olmoe": per_expert, "olmoe_sharded": per_expert, "deepseek_v3_fp8_b16": 2 * per_expert,  # + scales
                "gpt_oss_mxfp4": 6}[name]  # gate_up/down blocks, scales, bias
    assert len(names) == expected and all(f".{layer}." in n and ".experts." in n for n in names)
    if name == "olmoe":  # natural order: expert 2 before expert 10 (not string order)
        experts = [int(n.split(".experts.")[1].split(".")[0]) for n in names]
        assert experts == sorted(experts)
    assert json.loads(json.dumps(fp)) == fp
    assert source_fingerprint(ckpt, [layer]) == fp  # deterministic


def test_sample_reads_first_and_last_bytes_and_full_hash_reads_all(tmp_path):
    big = torch.zeros(SAMPLE_CHUNKS * SAMPLE_CHUNK_BYTES * 4, dtype=torch.uint8)  # 4x the sample
    path = tmp_path / "t.safetensors"

    def digests(t: torch.Tensor) -> tuple[str, str]:
        save_file({"x": t}, str(path))
        f = SafetensorsFile(path)
        info = f.info("x")
        out = tuple(_tensor_digest(f, info, full=full, chunks=SAMPLE_CHUNKS, chunk_bytes=SAMPLE_CHUNK_BYTES)
                    for full in (False, True))
        f.close()
        return out

    sample, full = digests(big)
    for index in (0, big.numel() - 1):  # the ends are always sampled
        edited = big.clone()
        edited[index] = 1
        assert all(a != b for a, b in zip(digests(edited), (sample, full)))
    edited = big.clone()
    edited[SAMPLE_CHUNK_BYTES + 7] = 1  # between the first two sampled runs
    got_sample, got_full = digests(edited)
    assert got_sample == sample and got_full != full  # only --full-hash sees it


def test_load_model_refuses_another_model_of_the_same_shape(checkpoint_dir, checkpoint_copy, tmp_path, capsys):
    # Before fingerprints this loaded silently (reconstruction error ~1.2 against the other model's experts).
    src, other = checkpoint_dir("olmoe"), checkpoint_copy("olmoe")
    rewrite_experts(other)
    _compress(src, tmp_path / "ov")
    first = expert_tensor_names(open_moe_checkpoint(str(other)), 0)[0]
    with pytest.raises(OverlaySourceMismatch, match=f"{first.replace('.', '[.]')}.*--force"):
        load_model(str(other), overlay=tmp_path / "ov")
    model = load_model(str(other), overlay=tmp_path / "ov", force=True)
    err = capsys.readouterr().err
    assert "WARNING: --force" in err and first in err
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 128, (1, 5))).logits).all()
    load_model(str(src), overlay=tmp_path / "ov")  # its own source: no warning
    assert capsys.readouterr().err == ""


def test_first_differing_tensor_is_named(checkpoint_copy, tmp_path):
    src = checkpoint_copy("olmoe")
    ckpt = _compress(src, tmp_path / "ov")
    config = read_config(tmp_path / "ov")
    assert source_mismatch(ckpt, config) is None
    target = "model.layers.1.mlp.experts.3.up_proj.weight"
    rewrite_experts(src, only=target)
    problem = source_mismatch(open_moe_checkpoint(str(src)), config)
    assert problem is not None and target in problem and "differs" in problem


def test_overlay_without_fingerprint_loads_with_one_warning_line(checkpoint_dir, tmp_path, capsys):
    src = checkpoint_dir("olmoe")
    _compress(src, tmp_path / "ov")
    path = tmp_path / "ov" / CONFIG_NAME
    config = json.loads(path.read_text())
    del config["source"]["fingerprint"]  # as written before this change
    path.write_text(json.dumps(config))
    load_model(str(src), overlay=tmp_path / "ov")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no source fingerprint" in lines[0]


def test_verify_of_a_mismatched_overlay_is_refused_not_an_index_error(checkpoint_dir, checkpoint_copy, tmp_path,
                                                                      capsys):
    # Before: verifying this 6-expert olmoe overlay against an 8-expert model crashed with "index 6 is out of bounds".
    _compress(checkpoint_dir("olmoe"), tmp_path / "ov")
    for force in (False, True):  # a structural mismatch is refused even with --force
        with pytest.raises(OverlaySourceMismatch, match="6 experts.*8.*--force cannot override"):
            verify_overlay(str(checkpoint_dir("qwen3_moe")), tmp_path / "ov", outputs=False, force=force)
    other = checkpoint_copy("olmoe")
    rewrite_experts(other)
    with pytest.raises(OverlaySourceMismatch, match="experts[.]0[.]"):
        verify_overlay(str(other), tmp_path / "ov", outputs=False)
    report = verify_overlay(str(other), tmp_path / "ov", outputs=False, force=True)
    assert "WARNING: --force" in capsys.readouterr().err
    assert max(r.max for r in report.reconstruction) > 0.5  # the other model's experts are not these


def test_check_source_accepts_the_model_source(checkpoint_dir, tmp_path):
    ckpt = _compress(checkpoint_dir("gpt_oss_mxfp4"), tmp_path / "ov")
    config = read_config(tmp_path / "ov")
    check_source(ckpt.source, config)  # a ModelSource (what load_model has) works as well as a MoeCheckpoint
    config["source"]["fingerprint"]["tensors"].popitem()
    with pytest.raises(OverlaySourceMismatch, match="not in the overlay's fingerprint"):
        check_source(ckpt, config)


def test_full_hash_catches_an_edit_the_sample_misses_and_loading_reads_only_the_sample(checkpoint_copy, tmp_path,
                                                                                       monkeypatch):
    import lazarus_core.overlay.fingerprint as fingerprint

    monkeypatch.setattr(fingerprint, "SAMPLE_CHUNKS", 2)  # sample = the first and last 16 bytes of each tensor
    monkeypatch.setattr(fingerprint, "SAMPLE_CHUNK_BYTES", 16)
    src = checkpoint_copy("olmoe")
    ckpt = open_moe_checkpoint(str(src))
    plan = plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=2), dtype="fp32")
    write_overlay(ckpt, tmp_path / "ov", plan, model=str(src), full_hash=True)
    config = read_config(tmp_path / "ov")
    entry = config["source"]["fingerprint"]["tensors"][(target := "model.layers.0.mlp.experts.2.gate_proj.weight")]
    assert config["source"]["fingerprint"]["full_hash"] and entry["sha256"] != entry["sha256_all"]
    f = SafetensorsFile(src / "model.safetensors")
    middle = f.info(target).start + f.info(target).nbytes // 2
    f.close()
    with open(src / "model.safetensors", "r+b") as fh:  # one weight edited between the sampled runs
        fh.seek(middle)
        byte = fh.read(1)
        fh.seek(middle)
        fh.write(bytes([byte[0] ^ 0x40]))
    edited = open_moe_checkpoint(str(src))
    check_source(edited, config)  # loading compares the sample: it reads no expert weights
    with pytest.raises(OverlaySourceMismatch, match=f"{target.replace('.', '[.]')}' differs [(]sha256 of all its bytes"):
        check_source(edited, config, all_bytes=True)
    with pytest.raises(OverlaySourceMismatch, match="all its bytes"):
        verify_overlay(str(src), tmp_path / "ov", outputs=False)  # verify reads every expert: it compares all
    with pytest.raises(OverlaySourceMismatch, match="--no-resume"):
        write_overlay(edited, tmp_path / "ov", plan, model=str(src), full_hash=True)
