"""From a moekit ModelConfig to the config.json of a Hugging Face family that computes the same thing, so a model
trained with moekit loads in transformers. Each family writer spells out every field transformers would otherwise
default; the result is then read back with moekit's own reader (model_from_hf) and must give the same model, or
the family is refused. Never a silently different model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from moekit.config.attention import RopeScaling
from moekit.config.model import ModelConfig

# Fields that change how a model trains, not what it computes at inference: left out of the comparison.
TRAINING_ONLY_MOE = dict(
    aux_loss_coef=0.0, seq_aux_loss_coef=0.0, z_loss_coef=0.0, bias_update_rate=0.0, jitter=0.0, backend="auto"
)


def rope_parameters(cfg: ModelConfig) -> dict:
    """transformers' rope_parameters: theta plus the scaling fields under their Hugging Face names."""
    out: dict = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    rs: RopeScaling | None = cfg.rope_scaling
    if rs is None:
        return out
    out.update(rope_type=rs.type, factor=rs.factor)
    if rs.original_max_position is not None:
        out["original_max_position_embeddings"] = rs.original_max_position
    if rs.type == "yarn":
        out.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, truncate=rs.truncate)
        out.update(mscale=rs.mscale, mscale_all_dim=rs.mscale_all_dim)
    elif rs.type == "llama3":
        out.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
    elif rs.type == "longrope":
        out.update(short_factor=list(rs.short_factor), long_factor=list(rs.long_factor))
        out.update(short_mscale=rs.short_mscale, long_mscale=rs.long_mscale)
    return out


def _common(cfg: ModelConfig, family: str, architecture: str) -> dict:
    return {
        "model_type": family,
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope_parameters(cfg),
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def _deepseek_moe(cfg: ModelConfig) -> dict:
    """The MoE fields DeepSeek-V2/V3 and GLM-4.5 name alike."""
    moe, spec = cfg.moe, cfg.moe.routing
    return dict(
        intermediate_size=cfg.dense_hidden or moe.expert_hidden,
        moe_intermediate_size=moe.expert_hidden,
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        n_shared_experts=moe.num_shared_experts,
        routed_scaling_factor=spec.scaling_factor,
        n_group=spec.n_group,
        topk_group=spec.topk_group,
        norm_topk_prob=spec.normalize,
        first_k_dense_replace=cfg.moe_layers[0] if cfg.moe_layers else cfg.num_layers,
    )


def _deepseek(cfg: ModelConfig, family: str) -> dict:
    moe, a, spec = cfg.moe, cfg.attention, cfg.moe.routing
    d = _common(cfg, family, "DeepseekV3ForCausalLM" if family == "deepseek_v3" else "DeepseekV2ForCausalLM")
    d.update(_deepseek_moe(cfg))
    d.update(
        n_shared_experts=moe.num_shared_experts or None,
        kv_lora_rank=a.kv_lora_rank,
        q_lora_rank=a.q_lora_rank,
        qk_rope_head_dim=a.qk_rope_head_dim,
        qk_nope_head_dim=a.qk_nope_head_dim,
        v_head_dim=a.v_head_dim,
        rope_interleave=a.rope_interleave,
        attention_bias=a.qkv_bias,
    )
    if family == "deepseek_v3":
        d["num_nextn_predict_layers"] = cfg.mtp_layers
    else:
        d.update(
            topk_method="group_limited_greedy" if spec.n_group > 1 else "greedy",
            scoring_func=spec.score_func,
            moe_layer_freq=1,
            aux_loss_alpha=moe.aux_loss_coef,
        )
    return d


def _glm4_moe(cfg: ModelConfig) -> dict:
    a = cfg.attention
    d = _common(cfg, "glm4_moe", "Glm4MoeForCausalLM")
    d["rope_parameters"]["partial_rotary_factor"] = a.partial_rotary
    d.update(_deepseek_moe(cfg))
    d.update(
        head_dim=cfg.head_dim,
        partial_rotary_factor=a.partial_rotary,
        use_qk_norm=a.qk_norm == "head",
        attention_bias=a.qkv_bias,
        num_nextn_predict_layers=cfg.mtp_layers,
    )
    return d


def _qwen(cfg: ModelConfig, family: str) -> dict:
    moe = cfg.moe
    d = _common(cfg, family, "Qwen3MoeForCausalLM" if family == "qwen3_moe" else "Qwen2MoeForCausalLM")
    d.update(
        head_dim=cfg.head_dim,
        intermediate_size=cfg.dense_hidden or moe.expert_hidden,
        moe_intermediate_size=moe.expert_hidden,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.routing.normalize,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(cfg.num_layers) if i not in cfg.moe_layers],
        router_aux_loss_coef=moe.aux_loss_coef,
        output_router_logits=False,
        use_sliding_window=False,
        sliding_window=None,
        attention_bias=cfg.attention.qkv_bias and family == "qwen3_moe",
    )
    if family == "qwen2_moe":
        d["shared_expert_intermediate_size"] = moe.shared_width
        d["qkv_bias"] = True
    return d


def _mixtral(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    d = _common(cfg, "mixtral", "MixtralForCausalLM")
    d.update(
        head_dim=cfg.head_dim,
        intermediate_size=moe.expert_hidden,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coef,
        router_jitter_noise=moe.jitter,
        output_router_logits=False,
        sliding_window=cfg.attention.sliding_window if cfg.attention.layer_types else None,
    )
    return d


WRITERS: dict[str, Callable[[ModelConfig], dict]] = {
    "deepseek_v3": lambda c: _deepseek(c, "deepseek_v3"),
    "deepseek_v2": lambda c: _deepseek(c, "deepseek_v2"),
    "glm4_moe": _glm4_moe,
    "qwen3_moe": lambda c: _qwen(c, "qwen3_moe"),
    "qwen2_moe": lambda c: _qwen(c, "qwen2_moe"),
    "mixtral": _mixtral,
}


def inference_view(cfg: ModelConfig) -> ModelConfig:
    """The config with everything that only matters to training (and names) set to fixed values."""
    moe = replace(cfg.moe, **TRAINING_ONLY_MOE) if cfg.moe else None
    return replace(cfg, moe=moe, family="moekit", name="", init_std=0.02, extra={})


def hf_family_for(cfg: ModelConfig) -> tuple[str, dict] | tuple[None, str]:
    """(family, config.json dict) of the first Hugging Face family that computes exactly cfg, or (None, why not)."""
    from moekit.config.hf_model import model_from_hf

    if cfg.moe is None or not cfg.moe_layers:
        return None, "a model without MoE layers has no MoE family"
    want = inference_view(cfg)
    reasons = []
    for family, write in WRITERS.items():
        try:
            hf = write(cfg)
            got = inference_view(model_from_hf(hf))
        except (ValueError, TypeError, KeyError) as e:
            reasons.append(f"{family}: {e}")
            continue
        if got == want:
            return family, hf
        reasons.append(f"{family}: differs in {', '.join(_differences(got, want))}")
    return None, "; ".join(reasons)


def _differences(a, b, prefix: str = "") -> list[str]:
    from dataclasses import fields, is_dataclass

    out = []
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x != y:
            if is_dataclass(x) and is_dataclass(y):
                out += _differences(x, y, f"{prefix}{f.name}.")
            else:
                out.append(f"{prefix}{f.name}")
    return out
