"""Scaled-down trainable copies of published model configs: the same routing, experts and layer pattern at a
width and depth a small machine trains."""

from __future__ import annotations

from pathlib import Path

from moekit.config.attention import AttentionConfig
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.families import load_model_config
from moekit.routing.spec import RoutingSpec


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
    keep.update(sliding_kv_heads=None, sliding_rope_theta=None)
    if a.kind == "gqa":
        keep.update(v_head_dim=0)
    if a.kind == "compressed":  # DeepSeek-V4: every layer is windowed, its kind kept
        keep.update(
            layer_types=tuple(a.layer_type(i) for i in range(num_layers)),
            sliding_window=a.sliding_window,
            q_lora_rank=width(a.q_lora_rank),
            o_groups=min(a.o_groups, num_heads),
            o_lora_rank=width(a.o_lora_rank),
            index_heads=min(a.index_heads, num_heads),
            index_head_dim=max(2, head_dim // 2 // 2 * 2),
            partial_rotary=max(2, int(head_dim * a.partial_rotary) // 2 * 2) / head_dim,
        )
    if a.kind == "mla":
        rope = max(2, head_dim // 2 // 2 * 2)
        keep.update(
            q_lora_rank=width(a.q_lora_rank) if a.q_lora_rank else None,
            kv_lora_rank=width(a.kv_lora_rank),
            qk_nope_head_dim=head_dim,
            qk_rope_head_dim=rope,
            v_head_dim=head_dim,
            index_head_dim=max(rope, head_dim) if a.index_topk else 0,
            index_heads=min(a.index_heads, num_heads),
            index_shared_layers=tuple(i for i in a.index_shared_layers if i < num_layers),
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
        hyper_streams=full.hyper_streams,
        table_layers=tuple(i for i in full.table_layers if i in moe_layers),
        family=full.family,
        name=f"{Path(str(name_or_path)).stem} scaled to D={hidden_size}, {num_layers} layers (from {full.num_layers})",
    )
