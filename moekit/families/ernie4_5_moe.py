"""Baidu ERNIE 4.5 MoE (`ernie4_5_moe`): softmax scores (fp32 router) whose top-k is chosen on the scores plus a
selection bias (moe_statics.e_score_correction_bias, stored [1, E]) and renormalised; MoE layers in a window
(from moe_layer_start_index to moe_layer_end_index, every moe_layer_interval-th), dense FFNs elsewhere; ungated
shared experts (moe_num_shared_experts x moe_intermediate_size wide); rope on interleaved pairs; tied embeddings
by default."""

from __future__ import annotations

from moekit.checkpoint.names import Fused, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.model import place_moe_layers
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, aux_loss_coef, experts_top_k, need
from moekit.routing.spec import RoutingSpec


class Ernie45Moe(Family):
    model_type = "ernie4_5_moe"
    architecture = "Ernie4_5_MoeForCausalLM"
    fused_steps = frozenset({"moe"})  # the GQA attention step rotates split halves, ERNIE interleaved pairs
    names = TensorNames(
        fused=(  # the selection bias is stored as a [1, E] row
            Fused(
                "model.layers.{i}.mlp.moe_statics.e_score_correction_bias",
                (("layers.{i}.mlp.router.selection_bias_E", "rows"),),
            ),
        )
    )

    def moe(self, c):
        if c.get("use_bias"):
            raise ValueError(
                "ernie4_5_moe: use_bias=true (biases on the dense FFNs but not the experts) is unsupported"
            )
        experts, top_k = experts_top_k(
            {**c, "num_experts": c.get("moe_num_experts"), "num_experts_per_tok": c.get("moe_k")}
        )
        spec = RoutingSpec(experts, top_k, selection_bias=True, normalize=True)
        shared = int(c.get("moe_num_shared_experts") or 0)
        width = need(c, "moe_intermediate_size")
        moe = MoEConfig(
            routing=spec,
            expert_hidden=width,
            num_shared_experts=shared,
            shared_hidden=shared * width if shared else None,
            aux_loss_coef=aux_loss_coef(c),
            bias_update_rate=0.0,
        )
        n = c["num_hidden_layers"]
        start, end = int(c.get("moe_layer_start_index", 1)), int(c.get("moe_layer_end_index", -1))
        end = n - 1 if end == -1 else end
        step = int(c.get("moe_layer_interval") or 1)
        layers = tuple(i for i in place_moe_layers(n, first_dense=start, step=step) if i <= end)
        return moe, layers, need(c, "intermediate_size")

    def attention(self, c):
        return AttentionConfig(rope_interleave=True)


FAMILY = Ernie45Moe()
