"""The one energy definition (kept_energy, energy_rank, captured_energy) on hand-made spectra, and the
compressor rank moe-type-analyze reports against the rank moe-overlay-compute chooses on planted checkpoints."""

import pytest
import torch

from lazarus_core.analysis.expert_structure import analyze_moe_type, analyze_projection
from lazarus_core.models import open_moe_checkpoint
from lazarus_core.overlay import PRESETS, make_policy, plan_overlay
from lazarus_core.spectra import ProjectionSpectrum
from tests.analysis.known_rank import EXPECTED_RANKS, write_known_rank_checkpoint
from tests.overlay.test_overlay_base import OWN_RANK, write_upcycled


def spectrum(singular, edges=None) -> ProjectionSpectrum:
    s = torch.tensor(singular, dtype=torch.float64)
    return ProjectionSpectrum(0, "gate", (s.shape[1], s.shape[1] + 3), s, s.square().sum(1) + 1.0,
                              None if edges is None else torch.tensor(edges, dtype=torch.float64))


def test_kept_energy_counts_only_components_above_the_noise_edge():
    sp = spectrum([[6.0, 4.0, 2.0, 1.0], [3.0, 3.0, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0]], edges=[1.5, 0.2, 0.1])
    assert sp.counted_components().tolist() == [3, 3, 0]
    # expert 0 counts 36 + 16 + 4 = 56, expert 1 counts 9 + 9 + 0.25 = 18.25, expert 2 nothing (keeps all)
    torch.testing.assert_close(sp.kept_energy(1), torch.tensor([36 / 56, 9 / 18.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sp.kept_energy(2), torch.tensor([52 / 56, 18 / 18.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sp.kept_energy(3), torch.ones(3, dtype=torch.float64))
    assert sp.energy_rank(0.9) == 2 and sp.energy_rank(0.95) == 3 and sp.energy_rank(1.0) == 3
    assert sp.captured_energy(2) == pytest.approx(52 / 56)  # the least any expert keeps
    assert sp.rank_above_noise() == [3, 3, 0]


def test_float_sources_count_every_component():
    sp = spectrum([[6.0, 4.0, 2.0, 1.0]])
    assert sp.counted_components().tolist() == [4] and sp.rank_above_noise() is None
    assert [sp.energy_rank(f) for f in (0.9, 0.95, 0.99)] == [EXPECTED_RANKS[f] for f in (0.9, 0.95, 0.99)]
    assert sp.captured_energy(3) == pytest.approx(56 / 57)


@pytest.mark.parametrize("quantised", [False, True])
def test_energy_rank_is_the_smallest_rank_every_expert_keeps_the_fraction_at(quantised):
    for _ in range(10):
        experts, width = int(torch.randint(1, 7, ())), int(torch.randint(1, 12, ()))
        singular = (torch.rand(experts, width) ** 3).sort(1, descending=True).values
        singular[torch.rand(experts) < 0.2] = 0.0  # some all-zero experts
        edges = (torch.rand(experts) * 0.5).tolist() if quantised else None
        sp = spectrum(singular.tolist(), edges)
        for fraction in (0.5, 0.9, 0.95, 0.99, 1.0):
            r = sp.energy_rank(fraction)
            assert bool((sp.kept_energy(r) >= fraction - 1e-12).all()), (fraction, r)
            assert sp.captured_energy(r) >= fraction - 1e-12
            if r > 0:
                assert bool((sp.kept_energy(r - 1) < fraction - 1e-12).any()), (fraction, r)


def _planted(kind, root):
    if kind == "upcycled":
        return write_upcycled(root / kind)
    family, storage = kind.split("-")
    return write_known_rank_checkpoint(family, root / kind, storage=storage)


@pytest.mark.parametrize("kind", ["olmoe-bf16", "gpt_oss-mxfp4", "upcycled"])
def test_compressor_rank_is_what_overlay_compute_chooses(kind, tmp_path):
    ckpt = open_moe_checkpoint(_planted(kind, tmp_path))
    layer = ckpt.moe_layers[0]
    report = analyze_moe_type(ckpt, [layer])
    balanced = plan_overlay(ckpt, [layer], make_policy(preset="balanced"))
    energy = plan_overlay(ckpt, [layer], make_policy(energy=PRESETS["balanced"]))
    for plan in (balanced, energy):
        for pp in plan.projections:
            structure = report.layers[0].projections[pp.projection]
            assert structure.compressor_rank == pp.rank, (kind, pp.projection)
            assert pp.captured_energy >= PRESETS["balanced"] - 1e-12
            assert min(structure.compressor_kept_energy) >= PRESETS["balanced"] - 1e-12
            assert len(structure.compressor_kept_energy) == ckpt.num_experts
    expected = OWN_RANK if kind == "upcycled" else EXPECTED_RANKS[0.95]
    assert max(p.compressor_rank for p in report.layers[0].projections.values()) <= expected
    assert report.compression["ratio"] == pytest.approx(balanced.bytes.expert_ratio)
    assert report.compression["compressible"] == (balanced.bytes.expert_ratio > 1.0)
    assert report.to_dict()["compression"]["preset"] == "balanced"


def test_compressor_rank_with_a_mean_base_is_read_off_the_classification_spectrum(tmp_path):
    ckpt = open_moe_checkpoint(write_upcycled(tmp_path / "upc"))
    mean = analyze_projection(ckpt, 0, "gate", base_method="mean")
    refined = analyze_projection(ckpt, 0, "gate")
    plan = plan_overlay(ckpt, [0], make_policy(preset="balanced"), base_method="mean")
    assert mean.compressor_rank == plan.ranks()[(0, "gate")]
    assert refined.compressor_rank <= OWN_RANK < mean.compressor_rank  # the mean spreads each difference
    assert mean.experts_rank_95 == refined.experts_rank_95  # the classification signal is the mean base's
