"""Phi-3.5-MoE (`phimoe`): SparseMixer top-2 selection, LayerNorm with biases, qkv/output and output-head biases,
sliding-window layers, per-expert w1/w3/w2 tensors under block_sparse_moe."""

from __future__ import annotations

from moekit.checkpoint.names import TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, aux_loss_coef, experts_top_k, layer_types, need
from moekit.families.mixtral import W123
from moekit.routing.spec import RoutingSpec


class Phimoe(Family):
    model_type = "phimoe"
    names = TensorNames(experts=W123)
    norm = "layer"
    fused_steps = frozenset()  # LayerNorm and SparseMixer selection: no fused step covers them

    def moe(self, c):
        eps = float(c.get("router_jitter_noise", 0.01) or 0.0)  # Phi's router_jitter_noise is SparseMixer's eps
        spec = RoutingSpec(*experts_top_k(c), score_func="sparsemixer", sparsemixer_eps=eps)
        moe = MoEConfig(
            routing=spec,
            expert_hidden=need(c, "intermediate_size"),
            aux_loss_coef=aux_loss_coef(c),
            jitter=float(c.get("input_jitter_noise") or 0.0),
        )
        return moe, tuple(range(c["num_hidden_layers"])), c.get("intermediate_size")

    def attention(self, c):
        bias, window = bool(c.get("attention_bias", False)), c.get("sliding_window") or None
        types = layer_types(c, c["num_hidden_layers"], "sliding" if window else None)
        return AttentionConfig(qkv_bias=bias, out_bias=bias, layer_types=types, sliding_window=window)


FAMILY = Phimoe()
