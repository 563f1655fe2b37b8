"""The engine's hardware paths against its serial per-expert path: the batched (device) kernels on CPU tensors,
the per-expert worker threads, and whole projection spectra (ranks equal, spectra to float64 rounding) on
random and planted-rank checkpoints, float and MXFP4 (noise edges) sources."""

import json

import pytest
import torch

from lazarus_core.models import open_moe_checkpoint
from lazarus_core.spectra import energy_rank, projection_spectrum, singular_values, spectrum_and_factors
from lazarus_core.spectra.linalg import GRAM_CHUNK, gram
from lazarus_core.spectra.parallel import (device_batch, dots_batched, gram_batched, map_deltas, resolve_device,
                                           resolve_workers, singular_values_batched, spectra_and_factors_batched)
from tests.analysis.known_rank import EXPECTED_RANKS, write_known_rank_checkpoint
from tests.fixtures.checkpoints import write_checkpoint

SHAPES = [(7, 13), (13, 7), (1, 5), (5, 1), (3, GRAM_CHUNK + 3), (GRAM_CHUNK + 3, 3)]
FRACTIONS = (0.5, 0.9, 0.95, 0.99)


def _batch(shape, planted: bool) -> torch.Tensor:
    """Three deltas of ``shape``: random, or of planted rank 1, 2 and 0 (an all-zero delta)."""
    if not planted:
        return torch.randn(3, *shape) * torch.rand(3, 1, shape[1]) ** 2
    return torch.stack([torch.randn(shape[0], r) @ torch.randn(r, shape[1]) for r in (1, 2, 0)])


@pytest.mark.parametrize("planted", [False, True], ids=["random", "planted"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batched_spectra_are_the_per_expert_spectra(shape, planted):
    deltas = _batch(shape, planted)
    torch.testing.assert_close(gram_batched(deltas), torch.stack([gram(d) for d in deltas]), rtol=1e-12, atol=1e-10)
    batched = singular_values_batched(deltas)
    assert batched.shape == (3, min(shape)) and batched.dtype == torch.float64
    for row, d in zip(batched, deltas):
        serial = singular_values(d)
        scale = float(serial.square().sum()) or 1.0
        torch.testing.assert_close(row.square(), serial.square(), rtol=1e-9, atol=1e-12 * scale)
        assert [energy_rank(row, f) for f in FRACTIONS] == [energy_rank(serial, f) for f in FRACTIONS]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batched_factors_are_the_per_expert_truncated_svd(shape):
    deltas = _batch(shape, planted=False)
    ranks = [0, 1, min(shape)]
    parts = spectra_and_factors_batched(deltas, lambda i, sv: ranks[i])
    for (singular, a, b), d, r in zip(parts, deltas, ranks):
        ref_singular, ref_a, ref_b = spectrum_and_factors(d, lambda _: r)
        assert a.shape == (shape[0], r) and b.shape == (r, shape[1]) and a.dtype == torch.float64
        torch.testing.assert_close(singular, ref_singular, rtol=1e-9, atol=1e-9 * float(ref_singular[0]))
        torch.testing.assert_close(a @ b, ref_a @ ref_b, rtol=0, atol=1e-9 * float(ref_singular[0]))


def test_batched_dots_are_float64_inner_products():
    deltas, base = torch.randn(4, 9, 11), torch.randn(9, 11)
    expected = (deltas.double() * base.double()).sum((1, 2))
    torch.testing.assert_close(dots_batched(deltas, base, chunk=7), expected, rtol=1e-12, atol=1e-10)


def test_map_deltas_in_worker_threads_yields_every_expert_in_order(tmp_path):
    ckpt = open_moe_checkpoint(write_checkpoint("olmoe", tmp_path / "olmoe"))
    layer = ckpt.moe_layers[0]
    base = torch.randn(ckpt.projection_shape("gate"))

    def probe(e, d):
        assert torch.get_num_threads() == 1 or workers == 1
        return e, d.clone()

    results = {}
    for workers in (1, 3):
        results[workers] = list(map_deltas(ckpt, layer, "gate", base, probe, workers=workers))
    assert [e for e, _ in results[3]] == list(range(ckpt.num_experts))
    for (e1, (i1, d1)), (e3, (i3, d3)) in zip(results[1], results[3]):
        assert e1 == e3 == i1 == i3
        torch.testing.assert_close(d3, d1, rtol=0, atol=0)
        torch.testing.assert_close(d1, ckpt.expert_weight(layer, "gate", e1) - base, rtol=0, atol=0)


def _spectra_equal(ckpt, layer, projection, base_method):
    serial = projection_spectrum(ckpt, layer, projection, base_method=base_method, workers=1)
    variants = {"workers=2": projection_spectrum(ckpt, layer, projection, base_method=base_method, workers=2),
                "batched cpu": projection_spectrum(ckpt, layer, projection, base_method=base_method, device="cpu",
                                                   batch=3)}
    for name, sp in variants.items():
        scale = float(serial.singular.square().sum(1).max()) or 1.0
        torch.testing.assert_close(sp.singular.square(), serial.singular.square(), rtol=1e-7, atol=1e-10 * scale,
                                   msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(sp.expert_energy, serial.expert_energy, rtol=1e-9, atol=1e-9)
        for f in FRACTIONS:
            assert sp.energy_rank(f) == serial.energy_rank(f), (name, f)
            assert [energy_rank(r, f) for r in sp.singular] == [energy_rank(r, f) for r in serial.singular], (name, f)
        if serial.noise_edge is not None:
            assert sp.rank_above_noise() == serial.rank_above_noise(), name
    return serial


@pytest.mark.parametrize("base_method", ["mean", "refined"])
@pytest.mark.parametrize("kind", ["olmoe", "gpt_oss_mxfp4"])
def test_parallel_and_batched_projection_spectra_equal_the_serial_one(kind, base_method, tmp_path):
    ckpt = open_moe_checkpoint(write_checkpoint(kind, tmp_path / kind))
    for projection in ("gate", "down"):
        _spectra_equal(ckpt, ckpt.moe_layers[0], projection, base_method)


def test_parallel_and_batched_paths_keep_planted_ranks(tmp_path):
    ckpt = open_moe_checkpoint(write_known_rank_checkpoint("olmoe", tmp_path / "known"))
    serial = _spectra_equal(ckpt, ckpt.moe_layers[0], "up", "mean")
    assert {f: serial.energy_rank(f) for f in EXPECTED_RANKS} == EXPECTED_RANKS


def test_bad_device_workers_and_batch_are_named():
    with pytest.raises(ValueError, match="--device"):
        resolve_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="workers"):
        resolve_workers(0, (4, 4))
    with pytest.raises(ValueError, match="batch"):
        device_batch((4, 4), 8, 0)
    assert resolve_workers(None, (4, 4)) == 1 and device_batch((4, 4), 8, 20) == 8


def test_cli_device_runs_the_spectra_there_and_refuses_a_missing_one(checkpoint_dir, tmp_path, capsys):
    from lazarus_core.cli.main import main
    from lazarus_core.spectra import parallel

    path = str(checkpoint_dir("olmoe"))
    try:
        assert main(["introspect", "moe-expert", "moe-type-analyze", "-m", path, "--layer", "0", "--no-progress",
                     "--base", "mean", "-o", str(tmp_path / "r.json"), "--device", "cpu"]) == 0
        assert parallel._DEFAULT["device"] == "cpu"
        ckpt = open_moe_checkpoint(path)
        projections = json.loads((tmp_path / "r.json").read_text())["layers"][0]["projections"]
        for p, structure in projections.items():
            serial = projection_spectrum(ckpt, 0, p, base_method="mean", workers=1)
            assert structure["experts_rank_95"] == [energy_rank(row, 0.95) for row in serial.singular], p
        assert main(["introspect", "moe-expert", "moe-overlay-compute", "-m", path, "--layer", "0", "--no-progress",
                     "--device", "cpu", "-o", str(tmp_path / "plan.json")]) == 0
        if not torch.cuda.is_available():
            for action in ("moe-type-compare", "moe-overlay-compute"):
                extra = ["-c", path] if action == "moe-type-compare" else []
                capsys.readouterr()
                assert main(["introspect", "moe-expert", action, "-m", path, "--layer", "0", "--no-progress",
                             "--device", "cuda", *extra]) != 0
                assert "--device cuda: no CUDA device" in capsys.readouterr().err
    finally:
        parallel.use_device("cpu")
