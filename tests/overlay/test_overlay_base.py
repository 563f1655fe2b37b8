"""The shared base: the refined base (alternating least squares) recovers an upcycled layer's own per-expert
ranks where the mean base spreads every expert's difference over all deltas; an MXFP4-stored base; energy
ranks counted above the rounding-noise edge for quantised sources."""

from __future__ import annotations

import pytest
import torch

from lazarus_core.models import open_moe_checkpoint
from lazarus_core.overlay import make_policy, plan_overlay, read_config, read_layer, write_overlay
from lazarus_core.spectra import overlay_base, projection_spectrum
from tests.fixtures.checkpoints import CONFIGS

OWN_RANK = 2


def write_upcycled(directory, *, seed: int = 0, scale: float = 0.5):
    """OLMoE whose experts are one dense MLP plus a rank-2 difference per expert (float, no noise)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS["olmoe"]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                dense = torch.randn(p.shape[1:]) * 0.1
                for e in range(p.shape[0]):
                    low = torch.randn(p.shape[1], OWN_RANK) @ torch.randn(OWN_RANK, p.shape[2])
                    p[e] = dense + scale * 0.1 * low / OWN_RANK ** 0.5
    directory.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    return str(write_upcycled(tmp_path_factory.mktemp("upc") / "olmoe"))


def test_refined_base_recovers_own_rank(upcycled):
    ckpt = open_moe_checkpoint(upcycled)
    for projection in ("gate", "down"):
        mean = projection_spectrum(ckpt, 0, projection, base_method="mean")
        refined = projection_spectrum(ckpt, 0, projection, base_method="refined")
        assert mean.energy_rank(0.999) > OWN_RANK  # the mean carries 1/E of every other expert's difference
        assert refined.energy_rank(0.999) <= OWN_RANK  # gate rows of a rank-2 fused delta: rank <= 2
        assert refined.relative_errors(OWN_RANK).max() < 0.1 * mean.relative_errors(OWN_RANK).max()


def test_mxfp4_base_is_stored_and_counted(upcycled, tmp_path):
    ckpt = open_moe_checkpoint(upcycled)
    layers = list(ckpt.moe_layers)
    plain = plan_overlay(ckpt, layers, make_policy(rank=OWN_RANK), dtype="bf16")
    packed = plan_overlay(ckpt, layers, make_policy(rank=OWN_RANK), dtype="bf16", base_dtype="mxfp4")
    i, h = ckpt.spec.expert_intermediate_size, ckpt.spec.hidden_size
    saved_per_layer = 3 * i * h * 2 - (2 * i * (h // 32) + h * (i // 32)) * 17
    assert plain.bytes.overlay_expert_bytes - packed.bytes.overlay_expert_bytes == len(layers) * saved_per_layer
    write_overlay(ckpt, tmp_path / "ov", packed, model=upcycled)
    config = read_config(tmp_path / "ov")
    assert config["base_dtype"] == "mxfp4" and config["base_method"] == "refined"
    f = read_layer(tmp_path / "ov", config, 0)
    base = overlay_base(ckpt, 0, "gate")
    err = float((f.base_fp32("gate") - base).norm() / base.norm())
    assert 0 < err < 0.2  # MXFP4 rounding, nothing worse
    with pytest.raises(ValueError, match="--base-dtype"):
        plan_overlay(ckpt, layers, make_policy(rank=1), base_dtype="int3")


def test_quantised_source_counts_energy_above_noise(checkpoint_dir):
    ckpt = open_moe_checkpoint(str(checkpoint_dir("gpt_oss_mxfp4")))
    sp = projection_spectrum(ckpt, 0, "up", base_method="mean")
    assert sp.noise_edge is not None and sp.noise_edge.shape == (ckpt.num_experts,)
    above = sp.rank_above_noise()
    assert sp.energy_rank(1.0) == max(above)  # components under the noise edge never count
    bf16 = projection_spectrum(open_moe_checkpoint(str(checkpoint_dir("gpt_oss"))), 0, "up", base_method="mean")
    assert bf16.noise_edge is None and bf16.rank_above_noise() is None


@pytest.mark.slow
def test_builtin_upcycled_ranks_are_the_trained_rank():
    from lazarus_core.models.builtin import resolve_builtin

    if resolve_builtin("demo:upcycled") is None:
        pytest.skip("demo:upcycled is not installed")
    ckpt = open_moe_checkpoint("demo:upcycled")
    plan = plan_overlay(ckpt, [ckpt.moe_layers[-1]], make_policy(energy=0.99), dtype="bf16")
    assert {p.rank for p in plan.projections} == {2}  # trained as base + rank-2 per expert, then MXFP4
    mean = plan_overlay(ckpt, [0], make_policy(energy=0.99), dtype="bf16", base_method="mean")
    assert min(p.rank for p in mean.projections) > 2
