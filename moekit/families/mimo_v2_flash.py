"""MiMo-V2-Flash (`mimo_v2_flash`): DeepSeek-V3's routing (sigmoid, selection bias, renormalised; no shared
expert) behind grouped-query attention whose sliding-window layers (five of every six) have twice the key/value
heads, attention sinks and their own rope theta; value heads narrower than query/key heads and scaled by a
constant; rotary embedding on the first third of each head. Reads transformers' fields and the original release's
(hybrid_layer_pattern, swa_* fields, sliding_window_size, moe_layer_freq as a list)."""

from __future__ import annotations

from dataclasses import replace

from moekit.checkpoint.names import ROUTER, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, experts_top_k, layer_types, listed_moe_layers, need
from moekit.routing.spec import RoutingSpec

PARTIAL_ROTARY = 0.334  # transformers' default: int(192 x 0.334) = 64 rotating dimensions


def _layer_types(c: dict) -> tuple[str, ...]:
    n = c["num_hidden_layers"]
    if c.get("layer_types"):
        return layer_types(c, n)
    if c.get("hybrid_layer_pattern"):  # the original release: 1 = sliding window
        return tuple("sliding" if p else "full" for p in c["hybrid_layer_pattern"])
    return tuple("full" if i == 0 or (i + 1) % 6 == 0 else "sliding" for i in range(n))


def _rope(c: dict, kind: str) -> dict:
    """The rope parameters of one layer type: transformers' per-type rope_parameters, else the release's fields."""
    per_type = c.get("rope_parameters") or {}
    if kind in per_type:
        return per_type[kind]
    theta = c.get("rope_theta" if kind == "full_attention" else "swa_rope_theta")
    default = 5_000_000.0 if kind == "full_attention" else 10_000.0
    return {"rope_theta": theta or default, "partial_rotary_factor": c.get("partial_rotary_factor") or PARTIAL_ROTARY}


class MimoV2Flash(Family):
    model_type = "mimo_v2_flash"
    architecture = "MiMoV2FlashForCausalLM"
    names = TensorNames(renames=(*ROUTER, (".self_attn.attention_sink_bias", ".self_attn.sinks")))
    # Value heads narrower than keys, scaled values and two rope thetas are not in the attention step.
    fused_steps = frozenset({"moe"})

    def moe(self, c):
        spec = RoutingSpec(
            *experts_top_k(c),
            score_func="sigmoid",
            selection_bias=True,
            normalize=bool(c.get("norm_topk_prob", True)),
            normalize_eps=1e-20,
            scaling_factor=float(c.get("routed_scaling_factor") or 1.0),
        )
        layers = listed_moe_layers(c)  # else transformers' default: the first layer dense
        if layers is None:
            layers = tuple(range(1, c["num_hidden_layers"]))
        return (
            MoEConfig(routing=spec, expert_hidden=need(c, "moe_intermediate_size")),
            layers,
            c.get("intermediate_size"),
        )

    def attention(self, c):
        types = _layer_types(c)
        window = c["sliding_window_size"] + 1 if c.get("sliding_window_size") else c.get("sliding_window")
        kv = need(c, "num_key_value_heads")
        return AttentionConfig(
            qkv_bias=bool(c.get("attention_bias", False)),
            sinks=True,
            sink_layers="sliding",
            layer_types=types,
            sliding_window=window if "sliding" in types else None,
            sliding_kv_heads=c.get("swa_num_key_value_heads") or 2 * kv,
            sliding_rope_theta=float(_rope(c, "sliding_attention")["rope_theta"]),
            value_scale=float(c.get("attention_value_scale") or 1.0),
            v_head_dim=need(c, "v_head_dim"),
            partial_rotary=float(_rope(c, "full_attention").get("partial_rotary_factor") or PARTIAL_ROTARY),
        )

    def read(self, hf: dict, name: str = "") -> ModelConfig:
        c = self.fields(hf)
        full = _rope(c, "full_attention")
        eps = c.get("rms_norm_eps") or c.get("layernorm_epsilon") or 1e-6
        flat = {**c, "rope_theta": full["rope_theta"], "rms_norm_eps": eps}  # its per-type rope is plain
        return replace(super().read(flat, name), rope_scaling=None)


FAMILY = MimoV2Flash()
