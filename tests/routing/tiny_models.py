"""Tiny random-weight MoE models of every supported family, built from transformers' own config classes."""

from __future__ import annotations

import torch

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, max_position_embeddings=128, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
FAMILIES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss")


def tiny_config(family: str, **overrides):
    """A 2-layer config with hidden 32 and 8 experts (4 for Mixtral / GPT-OSS), k = 2 (DeepSeek-V3: 3)."""
    import transformers as tf

    if family == "olmoe":
        cfg = tf.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=3)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, norm_topk_prob=False)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                                norm_topk_prob=True)
    elif family == "deepseek_v2":
        cfg = tf.DeepseekV2Config(**{**COMMON, **MLA}, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                  first_k_dense_replace=1, n_shared_experts=1, n_group=4, topk_group=2,
                                  topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    elif family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**{**COMMON, **MLA}, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                                  first_k_dense_replace=1, n_shared_experts=1, n_group=4, topk_group=2,
                                  norm_topk_prob=True, routed_scaling_factor=2.5, rope_scaling=None)
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=8)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    """A float32 eval-mode causal LM with random weights; routers scaled so logits are O(1) (no ties)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("router.weight", "mlp.gate.weight")):
                param.normal_(0.0, 1.0 / param.shape[1] ** 0.5 * 3)
            elif name.endswith("router.bias"):
                param.normal_(0.0, 0.5)
            elif "experts" in name:
                param.normal_(0.0, 0.2)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return model.eval()
