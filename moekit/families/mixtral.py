"""Mixtral (`mixtral`): softmax top-k renormalised over 8 experts, sliding-window attention where configured,
per-expert w1/w3/w2 tensors under block_sparse_moe."""

from __future__ import annotations

from moekit.checkpoint.names import ExpertKeys, GgufArch, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, aux_loss_coef, experts_top_k, layer_types, need
from moekit.routing.spec import RoutingSpec

W123 = ExpertKeys(per_expert=True, container="block_sparse_moe", gate="w1", up="w3", down="w2")


class Mixtral(Family):
    model_type = "mixtral"
    gguf_arch = GgufArch("llama", renormalised=True, rope_pairs=True)
    architecture = "MixtralForCausalLM"
    write_rank = 5
    names = TensorNames(experts=W123)

    def moe(self, c):
        spec = RoutingSpec(*experts_top_k(c), normalize=True)
        moe = MoEConfig(
            routing=spec,
            expert_hidden=need(c, "intermediate_size"),
            aux_loss_coef=aux_loss_coef(c),
            jitter=float(c.get("router_jitter_noise") or 0.0),
        )
        return moe, tuple(range(c["num_hidden_layers"])), c.get("intermediate_size")

    def attention(self, c):
        window = c.get("sliding_window") or None
        types = layer_types(c, c["num_hidden_layers"], "sliding" if window else None)
        return AttentionConfig(layer_types=types, sliding_window=window)

    def write(self, cfg: ModelConfig) -> dict:
        moe = cfg.moe
        return {
            **self.common_fields(cfg),
            "head_dim": cfg.head_dim,
            "intermediate_size": moe.expert_hidden,
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "router_aux_loss_coef": moe.aux_loss_coef,
            "router_jitter_noise": moe.jitter,
            "output_router_logits": False,
            "sliding_window": cfg.attention.sliding_window if cfg.attention.layer_types else None,
        }


FAMILY = Mixtral()
