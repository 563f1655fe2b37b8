"""Overlay compute and checkpoint: exact low-rank deltas reconstruct to fp32 rounding, rank policies, the
byte formula, atomic/resumable writes, and clear errors for malformed overlays."""

from __future__ import annotations

import json

import pytest
import torch

from lazarus_core.models import open_moe_checkpoint
from lazarus_core.overlay import make_policy, plan_overlay, read_config, read_layer, write_overlay
from lazarus_core.overlay.compute import compute_spectra
from lazarus_core.overlay.format import OverlayFormatError, shard_name
from lazarus_core.overlay.verify import reconstruction_errors
from lazarus_core.spectra import factorize
from tests.analysis.known_rank import EXPECTED_RANKS, write_known_rank_checkpoint


@pytest.fixture(scope="module")
def known_rank_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    return {"olmoe": write_known_rank_checkpoint("olmoe", root / "olmoe"),
            "gpt_oss_mxfp4": write_known_rank_checkpoint("gpt_oss", root / "gpt", storage="mxfp4")}


def test_factorize_is_truncated_svd():
    for shape in ((13, 29), (31, 7)):
        d = torch.randn(*shape)
        for r in (0, 1, 5, min(shape)):
            a, b = factorize(d, r)
            assert a.shape == (shape[0], r) and b.shape == (r, shape[1])
            u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
            best = (u[:, :r] * s[:r]) @ vh[:r]
            torch.testing.assert_close(a @ b, best, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["olmoe", "gpt_oss_mxfp4"])
def test_exact_low_rank_reconstructs_to_fp32_rounding(known_rank_dirs, tmp_path, name):
    ckpt = open_moe_checkpoint(str(known_rank_dirs[name]))
    plan = plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(energy=0.99), dtype="fp32")
    assert {p.rank for p in plan.projections} == {EXPECTED_RANKS[0.99]}
    assert max(p.error["max"] for p in plan.projections) < 1e-6
    write_overlay(ckpt, tmp_path / "ov", plan, model=str(known_rank_dirs[name]))
    errors = reconstruction_errors(ckpt, tmp_path / "ov")
    assert len(errors) == 3 * len(ckpt.moe_layers)
    assert max(e.max for e in errors) < 1e-6
    lower = plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=EXPECTED_RANKS[0.99] - 1), dtype="fp32")
    assert min(p.error["max"] for p in lower.projections) > 1e-3  # one rank less is visibly worse
    if name == "gpt_oss_mxfp4":
        f = read_layer(tmp_path / "ov", read_config(tmp_path / "ov"), ckpt.moe_layers[0])
        torch.testing.assert_close(f.bias["gate"], ckpt.expert_bias(ckpt.moe_layers[0], "gate"))  # never folded


def test_byte_formula_counts_mxfp4_at_4_25_bits(checkpoint_dir):
    ckpt = open_moe_checkpoint(str(checkpoint_dir("gpt_oss_mxfp4")))
    plan = plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=2), dtype="bf16")
    e, h, i = ckpt.num_experts, ckpt.spec.hidden_size, ckpt.spec.expert_intermediate_size
    weights = len(ckpt.moe_layers) * e * 3 * h * i * 4.25 / 8
    biases = len(ckpt.moe_layers) * e * (2 * i + h) * 2  # bf16 biases on disk
    assert plan.bytes.original_expert_bytes == weights + biases
    per_layer = sum((o * n + e * 2 * (o + n) + e * o) * 2 for o, n in ((i, h), (i, h), (h, i)))
    assert plan.bytes.overlay_expert_bytes == len(ckpt.moe_layers) * per_layer
    assert plan.bytes.expert_ratio == pytest.approx(plan.bytes.original_expert_bytes / plan.bytes.overlay_expert_bytes)


def test_target_ratio_allocates_energy_per_byte(checkpoint_dir):
    ckpt = open_moe_checkpoint(str(checkpoint_dir("olmoe_fp32")))
    layers = list(ckpt.moe_layers)
    spectra = compute_spectra(ckpt, layers)
    plan = plan_overlay(ckpt, layers, make_policy(target_ratio=1.5), dtype="bf16", spectra=spectra)
    assert plan.bytes.expert_ratio >= 1.5
    one_more = min(ckpt.num_experts * sum(sp.shape) * 2 for sp in spectra.values())
    assert plan.bytes.original_expert_bytes / (plan.bytes.overlay_expert_bytes + one_more) < 1.5  # budget used up
    ranks = plan.ranks()
    for key, sp in spectra.items():  # greedy: no unchosen component beats a chosen one by gain per byte
        if ranks[key] < sp.max_rank:
            nxt = float(sp.component_gain()[ranks[key]]) / (ckpt.num_experts * sum(sp.shape))
            for k2, sp2 in spectra.items():
                if ranks[k2] > 0:
                    assert float(sp2.component_gain()[ranks[k2] - 1]) / (ckpt.num_experts * sum(sp2.shape)) >= nxt * (1 - 1e-9)
    with pytest.raises(ValueError, match="unreachable"):
        plan_overlay(ckpt, layers, make_policy(target_ratio=100.0), spectra=spectra)


def test_policy_errors_name_the_flag():
    with pytest.raises(ValueError, match="--energy"):
        make_policy(rank=4, energy=0.9)
    with pytest.raises(ValueError, match="--energy must be in"):
        make_policy(energy=1.5)
    with pytest.raises(ValueError, match="--up-rank"):
        make_policy(gate_rank=2, down_rank=3)
    assert make_policy(gate_rank=2, rank=5).projection_ranks == {"gate": 2, "up": 5, "down": 5}
    assert make_policy().preset == "balanced"


def test_write_resume_and_no_resume(checkpoint_dir, tmp_path):
    src = str(checkpoint_dir("olmoe"))
    ckpt = open_moe_checkpoint(src)
    plan = plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=3), dtype="bf16")
    out = tmp_path / "ov"
    first = write_overlay(ckpt, out, plan, model=src)
    assert first["written_layers"] == list(ckpt.moe_layers) and not list(out.glob("*.tmp"))
    config = read_config(out)
    assert config["complete"] and config["format"] == "lazarus-overlay" and config["dtype"] == "bf16"
    assert config["layers"]["0"]["projections"]["down"]["shape"] == [ckpt.spec.hidden_size,
                                                                      ckpt.spec.expert_intermediate_size]
    (out / shard_name(ckpt.moe_layers[1])).write_bytes(b"torn")  # an interrupted write of the last layer
    again = write_overlay(ckpt, out, plan, model=src)
    assert again["resumed_layers"] == [ckpt.moe_layers[0]] and again["written_layers"] == [ckpt.moe_layers[1]]
    fresh = write_overlay(ckpt, out, plan, model=src, resume=False)
    assert fresh["resumed_layers"] == []
    other_storage = plan_overlay(ckpt, list(ckpt.moe_layers), make_policy(rank=3), dtype="fp16")
    with pytest.raises(ValueError, match="dtype 'bf16'.*--no-resume"):  # one overlay, one storage
        write_overlay(ckpt, out, other_storage, model=src)
    assert write_overlay(ckpt, out, plan, model="the same files by another name")["resumed_layers"] == \
        list(ckpt.moe_layers)  # the fingerprint, not the name, says what the source is


def test_malformed_overlay_errors_name_file_and_tensor(checkpoint_dir, tmp_path):
    src = str(checkpoint_dir("olmoe"))
    ckpt = open_moe_checkpoint(src)
    out = tmp_path / "ov"
    write_overlay(ckpt, out, plan_overlay(ckpt, [0], make_policy(rank=2), dtype="fp32"), model=src)
    config = read_config(out)
    config["layers"]["0"]["projections"]["up"]["rank"] = 3
    with pytest.raises(OverlayFormatError, match=r"layers\.0\.up\.A"):
        read_layer(out, config, 0)
    with pytest.raises(OverlayFormatError, match="layer 1 is not in this overlay"):
        read_layer(out, config, 1)
    (out / "overlay_config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OverlayFormatError, match="format"):
        read_config(out)
    with pytest.raises(FileNotFoundError, match="overlay_config.json"):
        read_config(tmp_path / "nowhere")
