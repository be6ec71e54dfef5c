"""GPT-OSS (`gpt_oss`): top-k on the raw router logits then a softmax over the k (a router bias), experts stored
stacked and input-major with biases, gate and up interleaved, a clamped SwiGLU; attention sinks, alternating
sliding-window and full layers."""

from __future__ import annotations

from moekit.checkpoint.names import STACKED, GgufArch, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.families.base import Family, aux_loss_coef, experts_top_k, layer_types, need
from moekit.routing.spec import RoutingSpec


class GptOss(Family):
    model_type = "gpt_oss"
    gguf_arch = GgufArch("gpt-oss", qkv_bias=True, head_required=True, oai=True)
    names = TensorNames(renames=(), experts=STACKED)  # already mlp.router.*

    def moe(self, c):
        layout = ExpertLayout(
            gate_up="interleaved",
            transposed=True,
            bias=True,
            activation="clamped_swiglu",
            swiglu_limit=float(c.get("swiglu_limit", 7.0)),
        )
        moe = MoEConfig(
            routing=RoutingSpec(*experts_top_k(c), softmax_after_topk=True),
            expert_hidden=need(c, "intermediate_size"),
            layout=layout,
            router_bias=True,
            aux_loss_coef=aux_loss_coef(c),
        )
        return moe, tuple(range(c["num_hidden_layers"])), None

    def attention(self, c):
        n_layers, bias = c["num_hidden_layers"], bool(c.get("attention_bias", False))
        types = layer_types(c, n_layers) or tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers))
        window = c.get("sliding_window") or None
        return AttentionConfig(qkv_bias=bias, out_bias=bias, sinks=True, layer_types=types, sliding_window=window)


FAMILY = GptOss()
