"""DBRX through the checkpoint side: facts from its nested config.json, the fused [E*I, H] reader, and
moe-type on generated checkpoints with known answers (exactly low-rank deltas -> pseudo-MoE; random -> native)."""

import json

import pytest
import torch

from lazarus_core.analysis.expert_structure import analyze_moe_type
from lazarus_core.cli.main import main
from lazarus_core.models import PROJECTIONS, UnsupportedModelError, detect_family, open_moe_checkpoint
from lazarus_core.models.errors import CheckpointError
from lazarus_core.overlay.sizes import expert_bytes_as_stored
from tests.analysis.known_rank import EXPECTED_RANKS, write_known_rank_checkpoint

# databricks/dbrx-instruct config.json (the MoE part as published; no ffn_act_fn / moe_normalize_expert_weights).
DBRX_INSTRUCT = {
    "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": 6144, "n_heads": 48, "n_layers": 40,
    "max_seq_len": 32768, "vocab_size": 100352,
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "rope_theta": 500000},
    "ffn_config": {"ffn_hidden_size": 10752, "moe_jitter_eps": 0, "moe_loss_weight": 0.05, "moe_num_experts": 16,
                   "moe_top_k": 4},
}


def test_real_dbrx_config_facts():
    spec = detect_family(DBRX_INSTRUCT)
    assert spec.family == "dbrx"
    assert (spec.hidden_size, spec.expert_intermediate_size, spec.num_experts, spec.top_k, len(spec.moe_layers)) == (
        6144, 10752, 16, 4, 40)  # DESIGN section 4
    r = spec.routing
    assert (r.scoring, r.order, r.renormalize, r.renormalize_p) == ("softmax", "score_then_topk", True, 1.0)
    assert not (r.router_bias or r.selection_bias or r.n_group) and r.routed_scaling_factor == 1.0
    assert spec.shared_experts is None and not spec.expert_bias and spec.expert_activation == "silu"
    names = spec.names
    assert names.layout == "dbrx" and names.fused and names.moe_prefix(3) == "transformer.blocks.3.ffn."
    assert [names.projection_name(p) for p in PROJECTIONS] == ["w1", "v1", "w2"] and names.router == "router.layer"
    assert json.loads(json.dumps(spec.to_dict()))["names"]["layers_prefix"] == "transformer.blocks"


def test_dbrx_detected_from_architectures_and_its_routing_options():
    config = {k: v for k, v in DBRX_INSTRUCT.items() if k != "model_type"}
    assert detect_family(config).family == "dbrx"
    ffn = DBRX_INSTRUCT["ffn_config"]
    p2 = detect_family({**DBRX_INSTRUCT, "ffn_config": {**ffn, "moe_normalize_expert_weights": 2}}).routing
    assert p2.renormalize and p2.renormalize_p == 2.0
    off = detect_family({**DBRX_INSTRUCT, "ffn_config": {**ffn, "moe_normalize_expert_weights": None}}).routing
    assert not off.renormalize
    gelu = detect_family({**DBRX_INSTRUCT, "ffn_config": {**ffn, "ffn_act_fn": {"name": "gelu"}}})
    assert gelu.expert_activation == "gelu"


@pytest.mark.parametrize("config,match", [
    ({k: v for k, v in DBRX_INSTRUCT.items() if k != "ffn_config"}, "lacks ffn_config"),
    ({**DBRX_INSTRUCT, "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4}}, "lacks ffn_hidden_size"),
    ({**DBRX_INSTRUCT, "ffn_config": {**DBRX_INSTRUCT["ffn_config"], "moe_normalize_expert_weights": -1}},
     "moe_normalize_expert_weights must be a positive number"),
    ({**DBRX_INSTRUCT, "ffn_config": {**DBRX_INSTRUCT["ffn_config"], "moe_top_k": 17}}, "num_experts_per_tok=17"),
    ({k: v for k, v in DBRX_INSTRUCT.items() if k != "d_model"}, "lacks d_model"),
    ({**DBRX_INSTRUCT, "ffn_config": {**DBRX_INSTRUCT["ffn_config"], "moe_top_k": 0}},
     "ffn_config.moe_top_k must be a positive integer"),
])
def test_bad_dbrx_config_is_one_clear_error(config, match):
    with pytest.raises(UnsupportedModelError, match=match):
        detect_family(config)


def test_fused_reader_sizes_and_wrong_shape(checkpoint_dir, checkpoint_copy):
    with open_moe_checkpoint(checkpoint_dir("dbrx")) as ckpt:
        assert ckpt.storage_format(0) == "bf16" and ckpt.projection_shape("down") == (64, 32)
        # the three fused [E*I, H] bf16 tensors of each layer, nothing else
        assert expert_bytes_as_stored(ckpt) == {0: 3 * 4 * 32 * 64 * 2, 1: 3 * 4 * 32 * 64 * 2}
        assert ckpt.router(1).weight.shape == (4, 64) and ckpt.router(1).bias is None
        assert ckpt.expert_bias(0, "down") is None
    path = checkpoint_copy("dbrx")  # a config that disagrees with the tensors: named tensor, both shapes
    config = json.loads((path / "config.json").read_text())
    config["ffn_config"]["ffn_hidden_size"] = 16
    (path / "config.json").write_text(json.dumps(config))
    with open_moe_checkpoint(path) as ckpt, pytest.raises(CheckpointError, match=r"experts\.mlp\.w1.*\[128, 64\].*\[64, 64\]"):
        ckpt.expert_weight(0, "gate", 0)


def test_exactly_low_rank_dbrx_reads_pseudo_moe_with_the_exact_ranks(tmp_path):
    path = write_known_rank_checkpoint("dbrx", tmp_path / "dbrx", shared_base=True)
    with open_moe_checkpoint(path) as ckpt:
        report = analyze_moe_type(ckpt)
        n = ckpt.num_experts
    assert report.family == "dbrx" and report.moe_type == "pseudo-moe" and report.agreement == 1.0
    assert [layer.layer for layer in report.layers] == [0, 1]
    for layer in report.layers:
        assert layer.moe_type == "pseudo-moe"
        for name, p in layer.projections.items():
            assert p.experts_rank_90 == [EXPECTED_RANKS[0.90]] * n, (layer.layer, name)
            assert p.experts_rank_95 == [EXPECTED_RANKS[0.95]] * n
            assert p.experts_rank_99 == [EXPECTED_RANKS[0.99]] * n


def test_random_dbrx_reads_native(checkpoint_dir):
    with open_moe_checkpoint(checkpoint_dir("dbrx")) as ckpt:
        report = analyze_moe_type(ckpt)
    assert report.moe_type == "native-moe" and all(layer.moe_type == "native-moe" for layer in report.layers)


def test_moe_type_cli_on_dbrx(checkpoint_dir, tmp_path):
    pseudo = write_known_rank_checkpoint("dbrx", tmp_path / "pseudo", shared_base=True)
    out = tmp_path / "c.json"
    rc = main(["introspect", "moe-expert", "moe-type-compare", "-m", str(pseudo), "-c", str(checkpoint_dir("dbrx")),
               "--layers", "all", "-o", str(out), "--no-progress"])
    assert rc == 0
    models = json.loads(out.read_text())["models"]
    assert [(m["family"], m["moe_type"]) for m in models] == [("dbrx", "pseudo-moe"), ("dbrx", "native-moe")]
    gate = models[0]["layers"][1]["projections"]["gate"]
    assert gate["shape"] == [32, 64] and gate["experts_rank_95"] == [EXPECTED_RANKS[0.95]] * 4
    single = tmp_path / "a.json"
    assert main(["introspect", "moe-expert", "moe-type-analyze", "-m", str(pseudo), "--layer", "0", "-o", str(single),
                 "--no-progress"]) == 0
    assert json.loads(single.read_text())["layers"][0]["projections"]["down"]["shape"] == [64, 32]


def test_dbrx_weights_equal_the_fused_rows(checkpoint_dir):
    # Independent of the reader: expert e is rows e*I:(e+1)*I of w1 / v1 / w2 (w2 transposed), read with safetensors.
    from safetensors import safe_open

    path = checkpoint_dir("dbrx")
    with safe_open(str(path / "model.safetensors"), "pt") as f, open_moe_checkpoint(path) as ckpt:
        for layer in ckpt.moe_layers:
            w = {n: f.get_tensor(f"transformer.blocks.{layer}.ffn.experts.mlp.{n}").float() for n in ("w1", "v1", "w2")}
            for e in range(ckpt.num_experts):
                rows = slice(e * 32, (e + 1) * 32)
                assert torch.equal(ckpt.expert_weight(layer, "gate", e), w["w1"][rows])
                assert torch.equal(ckpt.expert_weight(layer, "up", e), w["v1"][rows])
                assert torch.equal(ckpt.expert_weight(layer, "down", e), w["w2"][rows].T)


def test_encoded_expert_and_row_ranges_equal_the_decoded_weights(checkpoint_dir):
    with open_moe_checkpoint(checkpoint_dir("dbrx")) as ckpt:
        for projection in PROJECTIONS:
            for e in (0, ckpt.num_experts - 1):
                full = ckpt.expert_weight(1, projection, e)
                enc = ckpt.encoded_expert(1, projection, e)
                assert enc.format == "float" and enc.shape == full.shape and enc.rounding_noise_energy() is None
                assert torch.equal(enc.decode(), full)
                for start, stop in ((0, full.shape[0]), (3, 17), (5, 5)):
                    assert torch.equal(ckpt.expert_rows(1, projection, e, start, stop), full[start:stop])
