"""An MoE config.json of a family moekit does not know, read from the field names families commonly use (for
`moekit inspect` and `moekit plan`); every guess is reported as an assumption."""

from __future__ import annotations

from collections.abc import Iterable

from moekit.config.attention import AttentionConfig
from moekit.config.model import ModelConfig, place_moe_layers
from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.families.base import HF_LAYER_TYPES, layer_types
from moekit.families.deepseek_v2 import FAMILY as DEEPSEEK_V2
from moekit.routing.spec import RoutingSpec

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


def read_generic(c: dict, name: str, assumptions: list[str], known: Iterable[str]) -> ModelConfig:
    """An MoE config of a family moekit does not know (`known` are those it knows), from the common field names."""
    found = {k: _get(c, k) for k in ALIASES}
    essential = ("hidden_size", "num_layers", "num_heads", "vocab_size", "num_experts", "top_k")
    missing = [ALIASES[k][0] for k in essential if found[k] is None]
    if found["expert_hidden"] is None and found["dense_hidden"] is None:
        missing.append("moe_intermediate_size (or intermediate_size)")
    family = c.get("model_type", "unknown")
    if missing:
        raise ValueError(
            f"model_type={family!r} is not a family moekit knows ({', '.join(known)}) and its config lacks "
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
    if types and any(t not in HF_LAYER_TYPES for t in types):
        odd = sorted({t for t in types if t not in HF_LAYER_TYPES})
        assumptions.append(f"layer types {', '.join(odd)} counted as full attention (KV cache overestimated)")
        types = [t if t in HF_LAYER_TYPES else "full_attention" for t in types]
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
        attention=generic_attention(c),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        norm_eps=float(c.get("rms_norm_eps") or c.get("layer_norm_eps") or 1e-6),
        family=family,
        name=name,
    )


def generic_attention(c: dict) -> AttentionConfig:
    """MLA where the config has a latent KV rank (DeepSeek's fields), else grouped-query attention with the layer
    types and window it declares."""
    if c.get("kv_lora_rank"):
        return DEEPSEEK_V2.attention(c)
    types = layer_types(c, c["num_hidden_layers"])
    window = c.get("sliding_window") or None
    return AttentionConfig(
        qkv_bias=bool(c.get("attention_bias", False)), layer_types=types, sliding_window=window if types else None
    )
