"""Tiny random configs of every published family, made with transformers (the oracle), for tests."""

from __future__ import annotations

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=40,
    moe_intermediate_size=24,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_local_experts=8,
    num_experts=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# DeepSeek-V2/V3 share MLA shapes, groups, a shared expert and a dense first layer; they differ in q-LoRA,
# group selection, scaling and yarn's mscale.
MLA = {
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "head_dim": 4,
    "n_group": 4,
    "topk_group": 2,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5,  # the latent norms keep 1e-6 (as Kimi K2's and GLM-5's files expect)
}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}

EXTRA = {
    "mixtral": {"sliding_window": 5},
    "qwen2_moe": {"shared_expert_intermediate_size": 40, "decoder_sparse_step": 2},
    "qwen3_moe": {"mlp_only_layers": [1], "norm_topk_prob": True},
    "olmoe": {"clip_qkv": 3.0},
    "deepseek_v2": {
        **MLA,
        "q_lora_rank": None,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 1.5,
        "rope_scaling": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
    "deepseek_v3": {
        **MLA,
        "q_lora_rank": 12,
        "routed_scaling_factor": 2.5,
        "rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
    "glm4_moe": {
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "use_qk_norm": True,
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
    },
    "phimoe": {
        "attention_bias": True,
        "lm_head_bias": True,
        "router_jitter_noise": 0.3,
        "sliding_window": 6,
        "max_position_embeddings": 128,
        "rope_scaling": {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.2, 1.5, 2.0],
            "long_factor": [1.0, 2.0, 4.0, 8.0],
            "short_mscale": 1.1,
            "long_mscale": 1.3,
            "original_max_position_embeddings": 64,
        },
    },
    "gpt_oss": {
        "sliding_window": 4,
        "intermediate_size": 24,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
    },
    "llama4_text": {
        "intermediate_size": 24,
        "intermediate_size_mlp": 40,
        "interleave_moe_layer_step": 2,
        "attention_chunk_size": 6,
        "num_experts_per_tok": 1,
        "floor_scale": 4,
        "attn_scale": 0.5,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
}

# DeepSeek Sparse Attention: prompts longer than index_topk keys, and enough indexer heads that scores rarely tie
DSA = {
    **MLA,
    "q_lora_rank": 12,
    "index_topk": 5,
    "index_n_heads": 16,
    "index_head_dim": 8,
    "routed_scaling_factor": 2.5,
}
EXTRA["deepseek_v32"] = {**DSA, "rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}
EXTRA["glm_moe_dsa"] = {**DSA, "indexer_types": ["full", "full", "shared", "full"]}
EXTRA["mistral4"] = {
    **MLA,
    "qk_nope_head_dim": 4,  # the rotary half of each head: transformers' rope width is head_dim x this fraction
    "head_dim": 8,
    "q_lora_rank": 12,
    "routed_scaling_factor": 1.5,
    "rope_parameters": {
        **YARN,
        "rope_type": "yarn",
        "original_max_position_embeddings": 8,  # queries past position 8 are scaled up
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.5,
        "partial_rotary_factor": 0.5,
    },
}
EXTRA["mimo_v2_flash"] = {
    "head_dim": 24,  # rope on int(24 x 0.334) = 8 of them
    "v_head_dim": 16,
    "sliding_window": 4,
    "attention_value_scale": 0.707,
    "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 50_000.0, "partial_rotary_factor": 0.334},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.334},
    },
}
# DeepSeek-V4: every attention kind (windows of 4, CSA entries per 2 tokens with a 16-head indexer keeping 2, HCA per
# 4), a token-table layer, two hyper-connected streams, a limit the clamped SwiGLU reaches
EXTRA["deepseek_v4"] = {
    "head_dim": 16,
    "partial_rotary_factor": 0.5,
    "num_key_value_heads": 1,
    "q_lora_rank": 12,
    "o_groups": 2,
    "o_lora_rank": 8,
    "index_n_heads": 16,
    "index_head_dim": 8,
    "index_topk": 2,
    "sliding_window": 4,
    "compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
    "hc_mult": 2,
    "swiglu_limit": 0.5,
    "routed_scaling_factor": 1.5,
    "layer_types": [
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ],
    "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"],
}
EXTRA["minimax_m2"] = {"rotary_dim": 4}
EXTRA["dots1"] = {
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.0,
    "sliding_window": 4,
    "max_window_layers": 2,
}
EXTRA["dbrx"] = {}  # DBRX names its fields its own way: see _dbrx
# Granite: muP's constants away from 1, so that each is tested
GRANITE_MUP = {
    "embedding_multiplier": 3.0,
    "attention_multiplier": 0.2,
    "residual_multiplier": 0.5,
    "logits_scaling": 2.5,
    "attention_bias": True,
}
EXTRA["granitemoe"] = {**GRANITE_MUP, "intermediate_size": 24}
EXTRA["granitemoeshared"] = {**GRANITE_MUP, "intermediate_size": 24, "shared_intermediate_size": 40}
# ERNIE 4.5: a dense first layer, MoE on every second layer after it (1 and 3), two shared experts
EXTRA["ernie4_5_moe"] = {
    "moe_layer_start_index": 1,
    "moe_layer_interval": 2,
    "moe_num_shared_experts": 2,
    "moe_intermediate_size": 16,
    "tie_word_embeddings": True,
}
# Qwen3-Next: Gated DeltaNet layers (2 key heads, 4 value heads) around a gated full-attention layer, a shared
# expert behind a sigmoid gate, rope on a quarter of each head
EXTRA["qwen3_next"] = {
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 6,
    "linear_conv_kernel_dim": 4,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 20,
    "norm_topk_prob": True,
}
# Qwen3.5's text model: the same stack with split DeltaNet projections
EXTRA["qwen3_5_moe_text"] = {k: v for k, v in EXTRA["qwen3_next"].items() if k != "norm_topk_prob"}
# Jamba: Mamba and attention layers alternating, MoE on the Mamba ones, dt rank and state size of their own
EXTRA["jamba"] = {
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 0,
    "mamba_d_state": 8,
    "mamba_dt_rank": 4,
    "intermediate_size": 24,
}
# Granite 4.0-H: Mamba-2 (4 heads in 2 groups) and NoPE attention layers, muP, a shared MLP beside the experts
EXTRA["granitemoehybrid"] = {
    **GRANITE_MUP,
    "intermediate_size": 24,
    "shared_intermediate_size": 40,
    "layer_types": ["linear_attention", "attention", "linear_attention", "linear_attention"],
    "mamba_n_heads": 4,
    "mamba_n_groups": 2,
    "mamba_d_state": 8,
    "mamba_d_head": 16,
    "mamba_chunk_size": 8,
}
# Hunyuan: a top-k per layer, NTK-alpha rope, q/k/v/o biases (QK-norm after rope is always on)
EXTRA["hunyuan_v1_moe"] = {
    "num_experts_per_tok": [2, 1, 3, 2],
    "intermediate_size": 24,
    "attention_bias": True,
    "rope_parameters": {"rope_type": "dynamic", "alpha": 50.0, "factor": 1.0, "rope_theta": 10000.0},
}
FAMILIES = list(EXTRA)


def _dbrx(**overrides) -> dict:
    t = {**TINY, **overrides}
    return {
        "d_model": t["hidden_size"],
        "n_heads": t["num_attention_heads"],
        "n_layers": t["num_hidden_layers"],
        "vocab_size": t["vocab_size"],
        "max_seq_len": t["max_position_embeddings"],
        "attn_config": {"kv_n_heads": t["num_key_value_heads"], "clip_qkv": 3.0, "rope_theta": 10000.0},
        "ffn_config": {
            "ffn_hidden_size": t["intermediate_size"],
            "moe_num_experts": t["num_local_experts"],
            "moe_top_k": t["num_experts_per_tok"],
            "moe_normalize_expert_weights": 1.0,
        },
        "tie_word_embeddings": False,
    }


# Multimodal wrappers whose language model is another family's: moekit reads the text model.
WRAPPED = {"kimi_k25": "deepseek_v3"}
TINY_VISION = {
    "kimi_k25": dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        pos_emb_height=4,
        pos_emb_width=4,
    )
}


def tiny_config(family: str, **overrides):
    import transformers

    if family in WRAPPED:  # Kimi K2.5's text config names its model_type kimi_k2
        text = {**tiny_config(WRAPPED[family], **overrides).to_dict(), "model_type": "kimi_k2"}
        return transformers.AutoConfig.for_model(
            family,
            text_config=text,
            vision_config=TINY_VISION[family],
            projection_hidden_size=16,
            tie_word_embeddings=text["tie_word_embeddings"],
        )
    if family == "dbrx":
        return transformers.AutoConfig.for_model("dbrx", **_dbrx(**overrides))
    return transformers.AutoConfig.for_model(family, **{**TINY, **EXTRA[family], **overrides})


def hf_class(family: str):
    """transformers' class (or auto class) of a family's model with its head."""
    import transformers

    if family in WRAPPED:
        return transformers.AutoModelForImageTextToText
    if family == "mistral4":  # transformers 5.25 leaves it out of AutoModelForCausalLM
        return transformers.Mistral4ForCausalLM
    return transformers.AutoModelForCausalLM


def hf_build(family: str, config):
    """transformers' random model of a family's config."""
    cls = hf_class(family)
    return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)


SHARDED = ("mixtral", "deepseek_v3")  # saved in several shards


def hf_tiny_model(family: str, directory, **overrides):
    """A seeded tiny transformers model of `family`, saved to `directory` (sharded for SHARDED families). Norms,
    biases, sinks and selection biases are 1/0 at init: they are perturbed so that they are tested."""
    import torch

    torch.manual_seed(0)
    hf = hf_build(family, tiny_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            ones = ("norm" in name and "bias" not in name) or name.endswith("scale")  # init 1 (V4's hyper scales)
            if "norm" in name or "sinks" in name or "bias" in name or name.endswith(("base", "scale")):
                p.normal_(std=0.3).add_(1.0 if ones else 0.0)
        for name, b in hf.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(std=0.3)
            if "tid2eid" in name:  # DeepSeek-V4's token-to-experts table: distinct experts per token
                b.copy_(torch.rand(b.shape[0], hf.config.n_routed_experts).argsort(-1)[:, : b.shape[1]])
    hf.save_pretrained(directory, max_shard_size="60KB" if family in SHARDED else "5GB")
    return hf
