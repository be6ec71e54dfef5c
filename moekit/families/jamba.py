"""AI21 Jamba (`jamba`): Mamba-1 layers (moekit.layers.mamba, with RMSNorms on dt, B and C) and, every
attn_layer_period-th from attn_layer_offset, attention without any position embedding; an MoE FFN every
expert_layer_period-th layer from expert_layer_offset, dense elsewhere; softmax top-k weights not renormalised;
checkpoints name the FFN feed_forward (per-expert tensors inside it), its norm pre_ff_layernorm, the final norm
final_layernorm."""

from __future__ import annotations

import math

from moekit.checkpoint.names import ExpertKeys, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, aux_loss_coef, experts_top_k, need
from moekit.routing.spec import RoutingSpec


def _every(c: dict, period: str, offset: str) -> tuple[int, ...]:
    p, o = int(need(c, period)), int(need(c, offset))
    return tuple(i for i in range(c["num_hidden_layers"]) if i % p == o)


class Jamba(Family):
    model_type = "jamba"
    architecture = "JambaForCausalLM"
    names = TensorNames(
        renames=(
            (".feed_forward.router.weight", ".mlp.router.weight"),
            (".pre_ff_layernorm.", ".post_attention_layernorm."),
            ("^final_layernorm.", "^norm."),
            *((f".feed_forward.{proj}.", f".mlp.{proj}.") for proj in ("gate_proj", "up_proj", "down_proj")),
        ),
        experts=ExpertKeys(per_expert=True, container="feed_forward"),
    )
    fused_steps = frozenset({"moe"})  # its MoE layers are Mamba layers, which run the modules

    def moe(self, c):
        spec = RoutingSpec(*experts_top_k(c))
        moe = MoEConfig(routing=spec, expert_hidden=need(c, "intermediate_size"), aux_loss_coef=aux_loss_coef(c))
        return moe, _every(c, "expert_layer_period", "expert_layer_offset"), need(c, "intermediate_size")

    def attention(self, c):
        n, d = c["num_hidden_layers"], c["hidden_size"]
        attention = set(_every(c, "attn_layer_period", "attn_layer_offset"))
        rank = c.get("mamba_dt_rank", "auto")
        return AttentionConfig(
            layer_types=tuple("full" if i in attention else "mamba" for i in range(n)),
            nope_layers=tuple(sorted(attention)),
            mamba_state=int(c.get("mamba_d_state") or 16),
            mamba_conv=int(c.get("mamba_d_conv") or 4),
            mamba_expand=int(c.get("mamba_expand") or 2),
            mamba_dt_rank=math.ceil(d / 16) if rank in (None, "auto") else int(rank),
            mamba_conv_bias=bool(c.get("mamba_conv_bias", True)),
            mamba_proj_bias=bool(c.get("mamba_proj_bias", False)),
        )


FAMILY = Jamba()
