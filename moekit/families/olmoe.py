"""OLMoE (`olmoe`): softmax top-k (renormalised only with norm_topk_prob) on every layer, QK-norm over the whole
projection, clip_qkv."""

from __future__ import annotations

from moekit.checkpoint.names import GgufArch
from moekit.config.attention import AttentionConfig
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, aux_loss_coef, experts_top_k, need
from moekit.routing.spec import RoutingSpec


class Olmoe(Family):
    model_type = "olmoe"
    gguf_arch = GgufArch("olmoe", renormalised=False, qk_norm="full", head_required=True, full_kv_heads=True)

    def moe(self, c):
        spec = RoutingSpec(
            *experts_top_k(c),
            normalize=bool(c.get("norm_topk_prob", False)),
        )
        moe = MoEConfig(
            routing=spec,
            expert_hidden=need(c, "intermediate_size"),
            aux_loss_coef=aux_loss_coef(c),
        )
        return moe, tuple(range(c["num_hidden_layers"])), c.get("intermediate_size")

    def attention(self, c):
        return AttentionConfig(
            qkv_bias=bool(c.get("attention_bias", False)), qk_norm="full", clip_qkv=c.get("clip_qkv")
        )


FAMILY = Olmoe()
