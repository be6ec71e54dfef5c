"""From a Hugging Face config.json to a whole ModelConfig: the published families exactly, any other MoE config from
the common field names (with the assumptions made listed), and scaled-down trainable copies of either."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moekit.config.attention import AttentionConfig, RopeScaling
from moekit.config.hf import FAMILIES, family_of, load_hf_config, moe_from_hf, text_config
from moekit.config.model import ModelConfig, place_moe_layers
from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.routing.spec import RoutingSpec

NATIVE = "moekit"  # model_type of moekit's own format: a config no Hugging Face family computes exactly
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "chunked"}

# Field names that different families use for the same thing, most common first.
ALIASES = {
    "hidden_size": ("hidden_size", "d_model", "n_embd", "dim"),
    "num_layers": ("num_hidden_layers", "n_layers", "num_layers", "n_layer"),
    "num_heads": ("num_attention_heads", "n_heads", "num_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_n_heads", "multi_query_group_num"),
    "vocab_size": ("vocab_size", "padded_vocab_size", "n_vocab"),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"),
    "top_k": ("num_experts_per_tok", "experts_per_token", "moe_top_k", "moe_topk", "num_selected_experts", "top_k"),
    "expert_hidden": ("moe_intermediate_size", "expert_intermediate_size", "moe_ffn_hidden_size", "ffn_hidden_size"),
    "dense_hidden": ("intermediate_size", "ffn_hidden_size", "dense_intermediate_size"),
    "shared_experts": ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"),
    "shared_hidden": ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),
    "first_dense": ("first_k_dense_replace", "first_k_dense", "num_dense_layers"),
}


def _get(c: dict, name: str):
    for key in ALIASES[name]:
        for where in (c, c.get("ffn_config"), c.get("attn_config")):  # DBRX nests its MoE and attention fields
            if isinstance(where, dict) and where.get(key) is not None:
                value = where[key]
                return value[0] if isinstance(value, list) and value else value
    return None


def _layer_types(c: dict, n_layers: int, default: str | None = None) -> tuple[str, ...] | None:
    types = c.get("layer_types")
    if types:
        return tuple(_LAYER_TYPES.get(t, t) for t in types)
    return (default,) * n_layers if default else None


def attention_from_hf(c: dict, family: str) -> AttentionConfig:
    n_layers = c["num_hidden_layers"]
    bias = bool(c.get("attention_bias", False))
    if family in ("deepseek_v2", "deepseek_v3") or c.get("kv_lora_rank"):
        return AttentionConfig(
            kind="mla",
            qkv_bias=bias,
            out_bias=bias,
            rope_interleave=bool(c.get("rope_interleave", True)),
            q_lora_rank=c.get("q_lora_rank"),
            kv_lora_rank=c["kv_lora_rank"],
            qk_nope_head_dim=c["qk_nope_head_dim"],
            qk_rope_head_dim=c["qk_rope_head_dim"],
            v_head_dim=c["v_head_dim"],
        )
    window = c.get("sliding_window") or None
    if family == "mixtral":
        return AttentionConfig(
            layer_types=_layer_types(c, n_layers, "sliding" if window else None), sliding_window=window
        )
    if family in ("qwen2_moe", "qwen3_moe"):
        types = None
        if c.get("use_sliding_window") and window:
            max_window = c.get("max_window_layers", n_layers)
            types = _layer_types(c, n_layers) or tuple("sliding" if i < max_window else "full" for i in range(n_layers))
        return AttentionConfig(
            qkv_bias=family == "qwen2_moe" or bias,
            qk_norm="head" if family == "qwen3_moe" else "none",
            layer_types=types,
            sliding_window=window if types else None,
        )
    if family == "dbrx":
        return AttentionConfig(clip_qkv=c.get("clip_qkv"))
    if family == "phimoe":
        return AttentionConfig(
            qkv_bias=bias,
            out_bias=bias,
            layer_types=_layer_types(c, n_layers, "sliding" if window else None),
            sliding_window=window,
        )
    if family == "glm4_moe":
        return AttentionConfig(
            qkv_bias=bias,
            qk_norm="head" if c.get("use_qk_norm") else "none",
            partial_rotary=float(
                c.get("partial_rotary_factor") or (c.get("rope_parameters") or {}).get("partial_rotary_factor") or 0.5
            ),
        )
    if family == "olmoe":
        return AttentionConfig(qkv_bias=bias, qk_norm="full", clip_qkv=c.get("clip_qkv"))
    if family == "gpt_oss":
        types = _layer_types(c, n_layers) or tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers))
        return AttentionConfig(qkv_bias=bias, out_bias=bias, sinks=True, layer_types=types, sliding_window=window)
    if family == "llama4_text":
        interval = c.get("no_rope_layer_interval", 4) or 4
        uses_rope = c.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
        nope = tuple(i for i, r in enumerate(uses_rope) if not r)
        types = _layer_types(c, n_layers) or tuple("chunked" if r else "full" for r in uses_rope)
        chunk = c.get("attention_chunk_size")
        if not chunk:
            types = None
        return AttentionConfig(
            qkv_bias=bias,
            out_bias=bias,
            qk_norm="l2" if c.get("use_qk_norm", True) else "none",
            layer_types=types,
            chunk_size=chunk,
            nope_layers=nope,
            temperature_tuning=bool(c.get("attn_temperature_tuning", True)),
            attn_scale=float(c.get("attn_scale", 0.1)),
            floor_scale=float(c.get("floor_scale", 8192)),
            rope_interleave=True,
        )
    types = _layer_types(c, n_layers)
    return AttentionConfig(qkv_bias=bias, layer_types=types, sliding_window=window if types else None)


def model_from_hf(hf: dict, name: str = "", assumptions: list[str] | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face config. A known family is read exactly; any other MoE config is read from
    the common field names, and each guess is appended to `assumptions` (a list the caller passes in). A config
    lacking essential fields raises ValueError naming them."""
    if hf.get("model_type") == NATIVE:
        from moekit.config.serialize import model_config_from_dict

        if not isinstance(hf.get("moekit_config"), dict):
            raise ValueError("config.json has model_type 'moekit' but no moekit_config table")
        return replace(model_config_from_dict(hf["moekit_config"]), name=name)
    c = text_config(hf)
    family = c.get("model_type", hf.get("model_type"))
    if family == "llama4":
        family = "llama4_text"
    if family not in FAMILIES:
        return _generic(c, name, assumptions if assumptions is not None else [])
    family = family_of(hf)
    moe, layers, dense = moe_from_hf(hf)
    n_layers = c["num_hidden_layers"]
    head_dim = c.get("head_dim")
    if family in ("deepseek_v2", "deepseek_v3"):
        head_dim = None  # MLA sets its own head widths
    return ModelConfig(
        hidden_size=c["hidden_size"],
        num_layers=n_layers,
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=head_dim,
        moe=moe,
        moe_layers=layers,
        dense_hidden=dense if len(layers) < n_layers else None,
        vocab_size=c["vocab_size"],
        attention=attention_from_hf(c, family),
        rope_theta=float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
        rope_scaling=RopeScaling.from_hf(
            c.get("rope_scaling") or c.get("rope_parameters"), c.get("max_position_embeddings")
        ),
        norm_eps=float(c.get("rms_norm_eps", 1e-5 if family == "dbrx" else 1e-6)),
        norm={"phimoe": "layer", "dbrx": "layer_nobias"}.get(family, "rms"),
        lm_head_bias=bool(c.get("lm_head_bias", False)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_position=int(c.get("max_position_embeddings") or 4096),
        mtp_layers=int(c.get("num_nextn_predict_layers") or 0) if family in ("deepseek_v3", "glm4_moe") else 0,
        family=family,
        name=name,
    )


def _generic(c: dict, name: str, assumptions: list[str]) -> ModelConfig:
    """An MoE config of a family moekit does not know, from the common field names."""
    found = {k: _get(c, k) for k in ALIASES}
    essential = ("hidden_size", "num_layers", "num_heads", "vocab_size", "num_experts", "top_k")
    missing = [ALIASES[k][0] for k in essential if found[k] is None]
    if found["expert_hidden"] is None and found["dense_hidden"] is None:
        missing.append("moe_intermediate_size (or intermediate_size)")
    family = c.get("model_type", "unknown")
    if missing:
        raise ValueError(
            f"model_type={family!r} is not a family moekit knows ({', '.join(FAMILIES)}) and its config lacks "
            f"{', '.join(missing)}, which planning an MoE needs"
        )
    n_layers, e, k = found["num_layers"], found["num_experts"], found["top_k"]
    assumptions.append(f"unknown family {family!r}: read from common field names")
    f = found["expert_hidden"]
    if f is None:
        f = found["dense_hidden"]
        assumptions.append(f"expert width = intermediate_size = {f} (no moe_intermediate_size)")
    assumptions.append("experts are gated SwiGLU FFNs (3 matrices), routed by softmax top-k")
    shared = int(found["shared_experts"] or (1 if found["shared_hidden"] else 0))
    shared_hidden = found["shared_hidden"] or (shared * f if shared else None)
    first = int(found["first_dense"] or 0)
    step = int(c.get("decoder_sparse_step") or c.get("moe_layer_freq") or c.get("interleave_moe_layer_step") or 1)
    layers = place_moe_layers(n_layers, first, step, tuple(c.get("mlp_only_layers") or ()))
    if len(layers) < n_layers:
        assumptions.append(f"{n_layers - len(layers)} dense layers of width {found['dense_hidden'] or f}")
    else:
        assumptions.append("every layer is an MoE layer")
    heads = found["num_heads"]
    kv_heads = found["num_kv_heads"] or heads
    if found["num_kv_heads"] is None:
        assumptions.append("no key/value head count: multi-head attention (kv heads = heads)")
    moe = MoEConfig(
        routing=RoutingSpec(num_experts=e, top_k=k),
        expert_hidden=f,
        layout=ExpertLayout(),
        num_shared_experts=shared,
        shared_hidden=shared_hidden,
    )
    head_dim = c.get("head_dim")
    if head_dim is None and found["hidden_size"] % heads:
        head_dim = found["hidden_size"] // heads
        assumptions.append(f"head_dim = hidden_size // heads = {head_dim}")
    types = c.get("layer_types")
    if types and any(t not in _LAYER_TYPES for t in types):
        odd = sorted({t for t in types if t not in _LAYER_TYPES})
        assumptions.append(f"layer types {', '.join(odd)} counted as full attention (KV cache overestimated)")
        types = [t if t in _LAYER_TYPES else "full_attention" for t in types]
    c = {**c, "num_hidden_layers": n_layers, "layer_types": types}
    return ModelConfig(
        hidden_size=found["hidden_size"],
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        moe=moe,
        moe_layers=layers,
        dense_hidden=found["dense_hidden"] or f,
        vocab_size=found["vocab_size"],
        attention=attention_from_hf(c, family),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        norm_eps=float(c.get("rms_norm_eps") or c.get("layer_norm_eps") or 1e-6),
        family=family,
        name=name,
    )


def load_model_config(name_or_path: str | Path, assumptions: list[str] | None = None) -> ModelConfig:
    """The ModelConfig of a published name, a config.json path or a model directory."""
    return model_from_hf(load_hf_config(name_or_path), Path(str(name_or_path)).stem, assumptions)


def scaled_down(
    name_or_path: str | Path,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    vocab_size: int = 256,
    max_experts: int | None = None,
) -> ModelConfig:
    """A small trainable model with a published family's routing: the same experts, top-k, routing spec, shared
    experts, expert layout, attention variant and dense/MoE layer pattern; widths shrunk by hidden_size / D (at least
    16), the layers cut to num_layers keeping the first-dense pattern, byte vocabulary, the published query/KV head
    ratio. Windows, chunks and NoPE layers are dropped (sequences this short never reach them). max_experts caps
    the expert count (top-k and groups shrink in proportion) for the smallest machines."""
    full = load_model_config(name_or_path)
    scale = hidden_size / full.hidden_size
    width = lambda w: max(16, int(round(w * scale / 16)) * 16)
    layers = full.moe_layers
    first_dense = min(1, min(layers)) if layers else 0  # DeepSeek's 3 dense layers of 61 become 1 of a few
    step = (layers[1] - layers[0]) if len(layers) > 1 else 1
    phase = min(layers) % step if layers else 0
    moe_layers = tuple(i for i in range(first_dense, num_layers) if i % step == phase) if layers else ()
    moe, spec = full.moe, full.moe.routing
    if max_experts is not None and spec.num_experts > max_experts:
        shrink = spec.num_experts // max_experts
        spec = RoutingSpec(
            **{
                **spec.__dict__,
                "num_experts": max_experts,
                "top_k": max(1, spec.top_k // shrink),
                "n_group": max(1, spec.n_group // shrink) if spec.n_group > 1 else 1,
                "topk_group": max(1, spec.topk_group // shrink) if spec.n_group > 1 else 1,
            }
        )
    moe = MoEConfig(
        **{
            **moe.__dict__,
            "routing": spec,
            "expert_hidden": width(moe.expert_hidden),
            "shared_hidden": width(moe.shared_hidden) if moe.shared_hidden else None,
        }
    )
    a = full.attention
    head_dim = hidden_size // num_heads
    keep = {"layer_types": None, "sliding_window": None, "chunk_size": None, "nope_layers": ()}
    if a.kind == "mla":
        rope = max(2, head_dim // 2 // 2 * 2)
        keep.update(
            q_lora_rank=width(a.q_lora_rank) if a.q_lora_rank else None,
            kv_lora_rank=width(a.kv_lora_rank),
            qk_nope_head_dim=head_dim,
            qk_rope_head_dim=rope,
            v_head_dim=head_dim,
        )
    attention = AttentionConfig(**{**a.__dict__, **keep})
    kv_ratio = full.num_heads // full.num_kv_heads
    return ModelConfig(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=max(1, num_heads // kv_ratio),
        moe=moe,
        moe_layers=moe_layers,
        dense_hidden=width(full.dense_hidden) if full.dense_hidden else width(moe.expert_hidden * spec.top_k),
        vocab_size=vocab_size,
        attention=attention,
        rope_theta=full.rope_theta,
        norm_eps=full.norm_eps,
        family=full.family,
        name=f"{Path(str(name_or_path)).stem} scaled to D={hidden_size}, {num_layers} layers (from {full.num_layers})",
    )
