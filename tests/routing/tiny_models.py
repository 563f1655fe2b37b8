"""Tiny random-weight MoE models of every supported family, built from transformers' own config classes."""

from __future__ import annotations

import torch

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, max_position_embeddings=128, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
FAMILIES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "dbrx")


def tiny_config(family: str, **overrides):
    """A 2-layer config with hidden 32 and 8 experts (4 for Mixtral / GPT-OSS), k = 2 (DeepSeek-V3: 3).

    DBRX takes ``moe_normalize_expert_weights`` (default 1.0, as the real models) as an override too."""
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
    elif family == "dbrx":
        # transformers 5.24's DbrxAttention needs attn_config.rope_theta and a clip_qkv (None fails in clamp)
        p = overrides.pop("moe_normalize_expert_weights", 1.0)
        cfg = tf.DbrxConfig(d_model=COMMON["hidden_size"], n_heads=4, n_layers=2, max_seq_len=128, vocab_size=96,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                            ffn_config=dict(ffn_hidden_size=COMMON["intermediate_size"], moe_num_experts=8,
                                            moe_top_k=2, moe_normalize_expert_weights=p))
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
            if name.endswith(("router.weight", "mlp.gate.weight", "router.layer.weight")):
                param.normal_(0.0, 1.0 / param.shape[1] ** 0.5 * 3)
            elif name.endswith("router.bias"):
                param.normal_(0.0, 0.5)
            elif "experts" in name:
                param.normal_(0.0, 0.2)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return model.eval()


def tiny_tokenizer():
    """A word-level fast tokenizer (96 ids: specials, 26 letters' words, unknown) that adds a BOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in ("the a of and to in is it that was he for on are as with his they at be this from have or by one "
                 "had not but what all were when we there can an your which their said if do will each about how up "
                 "out them then she many some so these would other into has more her two like him see time could no "
                 "make than first been its who now people my made over did down only way find use may water long "
                 "little very after words called just where most know get through back much before go good new "
                 "write our used me man too any day same right look think also around another came come work three "
                 "word must because does part").split():
        if len(vocab) < 96:
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_checkpoint(family: str, path, seed: int = 0):
    """Write a tiny model and tokenizer with save_pretrained (safetensors) and return the directory."""
    model = tiny_model(family, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
