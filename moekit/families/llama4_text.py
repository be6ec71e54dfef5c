"""Llama 4 (`llama4_text`, or its multimodal wrapper `llama4`): sigmoid top-1 whose weight scales the expert input,
a shared expert on every MoE layer, MoE layers interleaved with dense ones, experts stacked input-major; chunked
attention with NoPE layers (temperature-tuned queries), L2 QK-norm, interleaved rope."""

from __future__ import annotations

from moekit.checkpoint.names import SHARED_EXPERT, STACKED, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.model import place_moe_layers
from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.families.base import Family, aux_loss_coef, experts_top_k, layer_types, need
from moekit.routing.spec import RoutingSpec


class Llama4Text(Family):
    model_type = "llama4_text"
    aliases = ("llama4",)
    names = TensorNames(renames=((".feed_forward.", ".mlp."), SHARED_EXPERT), experts=STACKED)
    # Chunked layers, NoPE temperature tuning, L2 QK-norm and interleaved rope are not in the attention step.
    fused_steps = frozenset({"moe"})

    def moe(self, c):
        f, n_layers = need(c, "intermediate_size"), c["num_hidden_layers"]
        moe = MoEConfig(
            routing=RoutingSpec(*experts_top_k(c), score_func="sigmoid", apply_to="input"),
            expert_hidden=f,
            layout=ExpertLayout(transposed=True),
            num_shared_experts=1,
            shared_hidden=f,
            aux_loss_coef=aux_loss_coef(c),
        )
        listed, step = c.get("moe_layers"), c.get("interleave_moe_layer_step", 1) or 1
        layers = tuple(listed) if listed is not None else place_moe_layers(n_layers, step=step)
        return moe, layers, c.get("intermediate_size_mlp")

    def attention(self, c):
        n_layers, bias = c["num_hidden_layers"], bool(c.get("attention_bias", False))
        interval = c.get("no_rope_layer_interval", 4) or 4
        uses_rope = c.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
        chunk = c.get("attention_chunk_size")
        types = (layer_types(c, n_layers) or tuple("chunked" if r else "full" for r in uses_rope)) if chunk else None
        return AttentionConfig(
            qkv_bias=bias,
            out_bias=bias,
            qk_norm="l2" if c.get("use_qk_norm", True) else "none",
            layer_types=types,
            chunk_size=chunk,
            nope_layers=tuple(i for i, r in enumerate(uses_rope) if not r),
            temperature_tuning=bool(c.get("attn_temperature_tuning", True)),
            attn_scale=float(c.get("attn_scale", 0.1)),
            floor_scale=float(c.get("floor_scale", 8192)),
            rope_interleave=True,
        )


FAMILY = Llama4Text()
