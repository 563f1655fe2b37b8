"""Expert-delta spectra and the native / pseudo-MoE classification on known answers and real layouts."""

import pytest
import torch

from lazarus_core.analysis.expert_structure import analyze_moe_type, analyze_projection, classify, parse_layers
from lazarus_core.models import open_moe_checkpoint
from tests.fixtures.checkpoints import CONFIGS

from .known_rank import EXPECTED_RANKS, write_known_rank_checkpoint

LAYOUTS = [(family, "bf16") for family in CONFIGS] + [("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4")]


@pytest.mark.parametrize("family,storage", LAYOUTS, ids=[f"{f}-{s}" for f, s in LAYOUTS])
def test_known_ranks_on_every_layout(family, storage, tmp_path):
    ckpt = open_moe_checkpoint(write_known_rank_checkpoint(family, tmp_path / family, storage=storage))
    layer = ckpt.moe_layers[0]
    for projection in ("gate", "up", "down"):
        result = analyze_projection(ckpt, layer, projection)
        n = ckpt.num_experts
        assert result.experts_rank_90 == [EXPECTED_RANKS[0.90]] * n, (projection, result.experts_rank_90)
        assert result.experts_rank_95 == [EXPECTED_RANKS[0.95]] * n
        assert result.experts_rank_99 == [EXPECTED_RANKS[0.99]] * n
        assert result.effective_rank_95 == EXPECTED_RANKS[0.95]
        # the mean is exactly zero, so the refined base stays zero and the compressor sees the same spectra
        # (quantised layouts: the 4 components all stand above the noise edge)
        assert result.compressor_rank == EXPECTED_RANKS[0.95]
        assert min(result.compressor_kept_energy) >= 0.95
        cos = torch.tensor(result.cosine_matrix)
        assert cos[0, 1] == pytest.approx(-1.0, abs=1e-9)  # +D / -D partners
        if n > 2:
            assert cos[0, 2] == pytest.approx(0.0, abs=1e-9)  # distinct Hadamard rows are orthogonal
        assert result.delta_energy_fraction == pytest.approx(1.0, abs=1e-9)  # the mean expert is exactly zero
        if family == "gpt_oss":
            assert result.bias is not None and result.bias["norm_mean"] > max(result.expert_norms)  # large biases
        if storage in ("mxfp4", "fp8"):
            assert result.noise_floor is not None and result.noise_floor.rank_above_noise == [4] * n
        else:
            assert result.noise_floor is None


def test_random_weight_model_is_native(checkpoint_dir):
    report = analyze_moe_type(open_moe_checkpoint(checkpoint_dir("olmoe_fp32")))
    assert report.moe_type == "native-moe" and report.agreement == 1.0
    assert all(layer.moe_type == "native-moe" for layer in report.layers)
    d = report.to_dict()
    for key in ("model", "family", "num_experts", "moe_type", "layers"):
        assert key in d
    proj = d["layers"][0]["projections"]["gate"]
    assert proj["shape"] == [32, 64] and proj["max_rank"] == 32 and len(proj["experts_rank_95"]) == 6
    assert set(d["layers"][0]["cosine_similarity"]) >= {"mean", "std"}


def test_shared_base_low_rank_is_pseudo(tmp_path):
    import json

    from safetensors.torch import save_file

    experts, out_dim, in_dim = 8, 48, 64
    base = torch.randn(out_dim, in_dim)
    tensors = {}
    for layer in range(2):
        for e in range(experts):
            for name, shape in (("gate_proj", (out_dim, in_dim)), ("up_proj", (out_dim, in_dim)),
                                ("down_proj", (in_dim, out_dim))):
                b = base if shape == (out_dim, in_dim) else base.T
                delta = 0.3 * torch.randn(shape[0], 2) @ torch.randn(2, shape[1])
                tensors[f"model.layers.{layer}.mlp.experts.{e}.{name}.weight"] = (b + delta).contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "olmoe", "num_hidden_layers": 2, "hidden_size": in_dim, "intermediate_size": out_dim,
        "num_experts": experts, "num_experts_per_tok": 2}))
    report = analyze_moe_type(open_moe_checkpoint(tmp_path))
    assert report.moe_type == "pseudo-moe" and report.agreement == 1.0
    # delta_e = D_e - mean(D): rank at most 2 + 2 * experts = 18 of 48, far below a native MoE's
    assert all(max(p.experts_rank_99) <= 18 for layer in report.layers for p in layer.projections.values())


def test_classify_thresholds():
    assert classify(0.1, 0.9)[0] == "pseudo-moe"
    assert classify(0.8, 0.0)[0] == "native-moe"
    assert classify(0.3, 0.5) == ("unknown", 0.0)
    assert 0.5 <= classify(0.8, 0.0)[1] <= 1.0


def test_parse_layers_errors():
    assert parse_layers("all", (1, 2)) == [1, 2] and parse_layers("2", (1, 2)) == [2]
    with pytest.raises(ValueError, match="not MoE layers"):
        parse_layers("0", (1, 2))
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layers("x", (1, 2))


@pytest.mark.parametrize("alias,expected", [("demo:native", "native-moe"), ("demo:upcycled", "pseudo-moe")])
def test_builtin_models_are_classified_on_every_layer(alias, expected):
    from lazarus_core.models.builtin import resolve_builtin

    assert resolve_builtin(alias) is not None, f"the built-in model {alias} is not installed"
    report = analyze_moe_type(open_moe_checkpoint(alias), base_method="mean")  # the call reads W_e - mean only
    assert len(report.layers) >= 4
    assert [layer.moe_type for layer in report.layers] == [expected] * len(report.layers)
    assert report.moe_type == expected and report.agreement == 1.0


@pytest.mark.parametrize("family,storage", [("olmoe", "bf16"), ("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4")])
def test_cosine_gram_chunk_parts_sum_to_the_flattened_gram(family, storage, tmp_path):
    from lazarus_core.analysis.expert_structure import _cosine_gram, cosine_chunks, cosine_gram_parts, sum_in_order

    ckpt = open_moe_checkpoint(write_known_rank_checkpoint(family, tmp_path / family, storage=storage))
    layer = ckpt.moe_layers[0]
    for projection in ("gate", "down"):
        chunks = cosine_chunks(ckpt, layer, projection, memory_experts=0.5)  # several chunks
        out_dim = ckpt.projection_shape(projection)[0]
        assert len(chunks) > 1 and chunks[0][0] == 0 and chunks[-1][1] == out_dim
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous, in order
        flat = torch.stack([ckpt.expert_weight(layer, projection, e).reshape(-1).double()
                            for e in range(ckpt.num_experts)])
        # a split into two shares (as two ranks compute them), summed in chunk order: the one-process Gram
        # (the first share pre-summed, the rest one Gram per chunk, as _expert_share sends them)
        half = len(chunks) // 2
        first = sum_in_order(cosine_gram_parts(ckpt, layer, projection, chunks[:half]), ckpt.num_experts)
        gram = sum_in_order([first, *cosine_gram_parts(ckpt, layer, projection, chunks[half:])], ckpt.num_experts)
        whole = sum_in_order(cosine_gram_parts(ckpt, layer, projection, chunks), ckpt.num_experts)
        assert torch.equal(gram, whole)
        torch.testing.assert_close(gram, flat @ flat.T, rtol=1e-5, atol=1e-5 * float(flat.square().sum(1).max()))
        torch.testing.assert_close(_cosine_gram(ckpt, layer, projection), flat @ flat.T, rtol=1e-5,
                                   atol=1e-5 * float(flat.square().sum(1).max()))  # the default chunks
