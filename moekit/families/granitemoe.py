"""IBM Granite MoE (`granitemoe`): Mixtral's routing written as a softmax over the top-k logits, each layer's
experts stacked in two tensors (block_sparse_moe.input_linear [E, 2F, D] and output_linear [E, D, F]), and muP's
constants: embeddings times embedding_multiplier, attention logits times attention_multiplier (instead of
1/sqrt(head_dim)), each block's output times residual_multiplier before its residual add, logits divided by
logits_scaling."""

from __future__ import annotations

from dataclasses import replace

from moekit.checkpoint.names import STACKED, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, aux_loss_coef, experts_top_k, need
from moekit.routing.spec import RoutingSpec

RENAMES = (
    (".block_sparse_moe.router.layer.weight", ".mlp.router.weight"),
    (".block_sparse_moe.input_linear.weight", ".mlp.experts.gate_up_proj"),
    (".block_sparse_moe.output_linear.weight", ".mlp.experts.down_proj"),
)
MUP = ("embedding_multiplier", "residual_multiplier", "logits_scaling")


class GraniteMoe(Family):
    model_type = "granitemoe"
    architecture = "GraniteMoeForCausalLM"
    names = TensorNames(renames=RENAMES, experts=STACKED)
    # the attention step adds its residual unscaled: with muP's residual multiplier the layers run the modules
    fused_steps = frozenset({"moe"})

    def moe(self, c):
        spec = RoutingSpec(*experts_top_k(c), softmax_after_topk=True)
        moe = MoEConfig(routing=spec, expert_hidden=need(c, "intermediate_size"), aux_loss_coef=aux_loss_coef(c))
        return moe, tuple(range(c["num_hidden_layers"])), None

    def attention(self, c):
        bias = bool(c.get("attention_bias", False))
        return AttentionConfig(qkv_bias=bias, out_bias=bias, softmax_scale=float(c.get("attention_multiplier", 1.0)))

    def read(self, hf: dict, name: str = "") -> ModelConfig:
        c = self.fields(hf)
        return replace(super().read(hf, name), **{k: float(c.get(k) or 1.0) for k in MUP})


FAMILY = GraniteMoe()
