"""Tencent Hunyuan MoE v1 (`hunyuan_v1_moe`, Hunyuan-A13B): softmax top-k renormalised with an fp32 router
(mlp.gate.wg), an ungated shared MLP as wide as each expert, RMSNorm per head on queries and keys after rope
(query_layernorm / key_layernorm), a top-k per layer where moe_topk is a list, and NTK-alpha rope: a "dynamic"
rope_parameters entry with a fixed alpha stretches the base to theta * alpha^(d / (d - 2)), static in position."""

from __future__ import annotations

from dataclasses import replace

from moekit.checkpoint.names import TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, aux_loss_coef, need
from moekit.routing.spec import RoutingSpec


def _per_layer(c: dict, key: str) -> list[int]:
    value = need(c, key)
    return list(value) if isinstance(value, list) else [value] * c["num_hidden_layers"]


class HunYuanMoE(Family):
    model_type = "hunyuan_v1_moe"
    architecture = "HunYuanMoEV1ForCausalLM"
    names = TensorNames(
        renames=(
            (".mlp.gate.wg.weight", ".mlp.router.weight"),
            (".mlp.shared_mlp.", ".mlp.shared_experts."),
            (".self_attn.query_layernorm.", ".self_attn.q_norm."),
            (".self_attn.key_layernorm.", ".self_attn.k_norm."),
        )
    )
    fused_steps = frozenset({"moe"})  # the attention step norms queries and keys before rope, Hunyuan after

    def moe(self, c):
        experts = set(_per_layer(c, "num_experts"))
        if len(experts) > 1:
            raise ValueError(f"num_experts={c['num_experts']!r}: a different expert count per layer is unsupported")
        width = need(c, "intermediate_size")
        spec = RoutingSpec(experts.pop(), _per_layer(c, "moe_topk")[0], normalize=True)
        moe = MoEConfig(
            routing=spec,
            expert_hidden=width,
            num_shared_experts=1,
            shared_hidden=width,
            aux_loss_coef=aux_loss_coef(c),
        )
        return moe, tuple(range(c["num_hidden_layers"])), None

    def attention(self, c):
        bias = bool(c.get("attention_bias", False))
        return AttentionConfig(qkv_bias=bias, out_bias=bias, qk_norm="head_after_rope")

    def read(self, hf: dict, name: str = "") -> ModelConfig:
        c = self.fields(hf)
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        if rope.get("alpha"):  # NTK-alpha: a static stretch of the base, nothing scaled by position
            d = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
            theta = float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0)
            plain = {"rope_type": "default", "rope_theta": theta * float(rope["alpha"]) ** (d / (d - 2))}
            hf = {**hf, "rope_parameters": plain, "rope_scaling": None, "rope_theta": plain["rope_theta"]}
        cfg = super().read(hf, name)
        top_k = _per_layer(c, "moe_topk")
        return replace(cfg, layer_top_k=tuple(top_k)) if len(set(top_k)) > 1 else cfg


FAMILY = HunYuanMoE()
