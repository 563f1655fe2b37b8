"""Family detection from config.json and each family's facts (routing convention, MoE layers, sizes)."""

import json

import pytest

from lazarus_core.models import SUPPORTED_FAMILIES, UnsupportedModelError, detect_family
from tests.fixtures.checkpoints import CONFIGS


@pytest.mark.parametrize("family", list(CONFIGS))
def test_detects_every_family_from_transformers_config(family):
    spec = detect_family(CONFIGS[family]().to_dict())
    assert spec.family == family
    assert json.loads(json.dumps(spec.to_dict()))["family"] == family


def test_detects_from_architectures_when_model_type_is_absent():
    config = CONFIGS["mixtral"]().to_dict()
    del config["model_type"]
    config["architectures"] = ["MixtralForCausalLM"]
    assert detect_family(config).family == "mixtral"


def test_expert_count_never_decides_the_family():
    config = CONFIGS["olmoe"]().to_dict()
    config["num_experts"] = 128  # Qwen3-like count, still OLMoE
    assert detect_family(config).family == "olmoe"
    with pytest.raises(UnsupportedModelError):
        detect_family({"num_experts": 64, "num_experts_per_tok": 8, "hidden_size": 2048, "num_hidden_layers": 16})


def test_unsupported_lists_supported_families():
    with pytest.raises(UnsupportedModelError) as info:
        detect_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert "'llama'" in str(info.value)
    assert all(f in str(info.value) for f in SUPPORTED_FAMILIES)


def test_routing_conventions():
    spec = {f: detect_family(CONFIGS[f]().to_dict()) for f in CONFIGS}
    olmoe = spec["olmoe"].routing
    assert (olmoe.scoring, olmoe.order, olmoe.renormalize) == ("softmax", "score_then_topk", False)
    assert spec["qwen3_moe"].routing.renormalize is True
    for f in ("mixtral", "gpt_oss"):
        assert spec[f].routing.order == "topk_then_softmax"
    assert spec["gpt_oss"].routing.router_bias and spec["gpt_oss"].expert_bias
    v2, v3 = spec["deepseek_v2"].routing, spec["deepseek_v3"].routing
    assert (v2.scoring, v2.n_group, v2.topk_group, v2.group_score, v2.routed_scaling_factor) == ("softmax", 2, 1, "max", 1.5)
    assert not v2.selection_bias and not v2.renormalize
    assert (v3.scoring, v3.selection_bias, v3.renormalize, v3.group_score, v3.routed_scaling_factor) == (
        "sigmoid", True, True, "top2_sum", 2.5)


def test_moe_layers_and_shared_experts():
    qwen2 = detect_family(CONFIGS["qwen2_moe"]().to_dict())
    assert qwen2.moe_layers == (0, 2) and qwen2.dense_layers == (1,)
    assert qwen2.shared_experts.gate_module == "shared_expert_gate" and qwen2.shared_experts.intermediate_size == 64
    sparse_step = CONFIGS["qwen2_moe"]().to_dict() | {"mlp_only_layers": [], "decoder_sparse_step": 2}
    assert detect_family(sparse_step).moe_layers == (1,)
    v2 = detect_family(CONFIGS["deepseek_v2"]().to_dict())
    assert v2.moe_layers == (1, 2) and v2.shared_experts.intermediate_size == 2 * 32 and v2.shared_experts.num_shared == 2
    mixtral = detect_family(CONFIGS["mixtral"]().to_dict())
    assert mixtral.names.moe_module == "block_sparse_moe" and mixtral.names.projection_name("up") == "w3"


def test_real_model_sizes():
    # Published sizes (DESIGN section 4) through transformers' default configs where they match the real models.
    from transformers import DeepseekV3Config, GptOssConfig

    v3 = detect_family(DeepseekV3Config().to_dict())
    assert (v3.hidden_size, v3.expert_intermediate_size, v3.num_experts, v3.top_k, len(v3.moe_layers)) == (
        7168, 2048, 256, 8, 58)
    oss = detect_family(GptOssConfig().to_dict())
    assert (oss.hidden_size, oss.expert_intermediate_size, oss.num_experts, oss.top_k) == (2880, 2880, 128, 4)


@pytest.mark.parametrize("bad,match", [
    ({"num_experts_per_tok": 0}, "positive integer"),
    ({"num_experts": None, "num_local_experts": None}, "lacks num_experts"),
    ({"num_experts_per_tok": 99}, r"num_experts_per_tok=99 > num_experts=6"),
])
def test_bad_family_configs(bad, match):
    config = CONFIGS["olmoe"]().to_dict() | bad
    with pytest.raises(UnsupportedModelError, match=match):
        detect_family(config)
