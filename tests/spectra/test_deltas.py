"""The engine's streaming passes against plain decoded experts: the mean, the deltas, the rounding-noise
edges (one pass with the mean), the refined base's probe rank, and bad input."""

import pytest
import torch

from lazarus_core.models import open_moe_checkpoint
from lazarus_core.spectra import (iter_deltas, marchenko_pastur_edge, mean_and_noise, mean_expert, noise_edges,
                                  overlay_base)
from lazarus_core.spectra.deltas import _probe_rank


@pytest.mark.parametrize("name", ["gpt_oss_mxfp4", "olmoe"])
def test_mean_deltas_and_noise_match_the_decoded_experts(checkpoint_dir, name):
    ckpt = open_moe_checkpoint(str(checkpoint_dir(name)))
    layer = ckpt.moe_layers[0]
    for projection in ("gate", "down"):
        experts = torch.stack([ckpt.expert_weight(layer, projection, e) for e in range(ckpt.num_experts)])
        mean, noise = mean_and_noise(ckpt, layer, projection)
        torch.testing.assert_close(mean, experts.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean_expert(ckpt, layer, projection), mean, rtol=0, atol=0)
        for e, delta in iter_deltas(ckpt, layer, projection, mean):
            torch.testing.assert_close(delta, experts[e] - mean, rtol=1e-5, atol=1e-6)
        edges = noise_edges(ckpt, layer, projection)
        if name == "olmoe":
            assert noise is None and edges is None
        else:
            want = [ckpt.encoded_expert(layer, projection, e).rounding_noise_energy() for e in range(ckpt.num_experts)]
            torch.testing.assert_close(noise, torch.tensor(want, dtype=torch.float64))
            torch.testing.assert_close(edges, marchenko_pastur_edge(noise, ckpt.projection_shape(projection)))


def test_marchenko_pastur_edge_of_white_noise():
    out_dim, in_dim = 300, 700
    noise = torch.randn(out_dim, in_dim, dtype=torch.float64) * 0.3
    edge = marchenko_pastur_edge(noise.square().sum()[None], (out_dim, in_dim))
    top = torch.linalg.svdvals(noise)[0]
    assert 0.95 < float(top / edge[0]) < 1.02  # the largest singular value of white noise sits at the edge


def test_probe_rank_is_the_largest_gap_above_the_floor():
    s = torch.tensor([10.0, 9.0, 1.0, 0.9, 0.0], dtype=torch.float64)
    assert _probe_rank(s, None, cap=4) == 4  # float source: the drop from 0.9 to exactly zero is the largest
    assert _probe_rank(s, None, cap=3) == 2  # at most 3 components: 9 -> 1 is the largest ratio among them
    assert _probe_rank(s, 5.0, cap=4) == 2  # above the edge: 10, 9; then the gap to 1
    assert _probe_rank(s, 9.5, cap=4) == 1
    assert _probe_rank(s, None, cap=1) == 1
    assert _probe_rank(torch.zeros(3, dtype=torch.float64), None, cap=2) == 0
    assert _probe_rank(s, 20.0, cap=4) == 0  # nothing above the noise edge


def test_unknown_base_method_is_refused(checkpoint_dir):
    ckpt = open_moe_checkpoint(str(checkpoint_dir("olmoe")))
    with pytest.raises(ValueError, match="--base"):
        overlay_base(ckpt, ckpt.moe_layers[0], "gate", method="median")
