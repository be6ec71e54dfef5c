"""MiniMax-M2 (`minimax_m2`): Mixtral's layout and files (per-expert w1/w3/w2 under block_sparse_moe) with sigmoid
scores, a selection-only bias and renormalised weights; QK-norm over the whole q / k projection and rotary
embedding on the first rotary_dim dimensions of each head."""

from __future__ import annotations

from moekit.checkpoint.names import ROUTER, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, aux_loss_coef, experts_top_k, need, partial_rotary
from moekit.families.mixtral import W123
from moekit.routing.spec import RoutingSpec


class MinimaxM2(Family):
    model_type = "minimax_m2"
    names = TensorNames(
        renames=(*ROUTER, (".block_sparse_moe.e_score_correction_bias", ".mlp.router.selection_bias_E")),
        experts=W123,
    )

    def moe(self, c):
        spec = RoutingSpec(*experts_top_k(c), score_func="sigmoid", selection_bias=True, normalize=True)
        moe = MoEConfig(
            routing=spec,
            expert_hidden=need(c, "intermediate_size"),
            aux_loss_coef=aux_loss_coef(c),
            jitter=float(c.get("router_jitter_noise") or 0.0),
        )
        return moe, tuple(range(c["num_hidden_layers"])), None

    def attention(self, c):
        return AttentionConfig(qk_norm="full", partial_rotary=partial_rotary(c))


FAMILY = MinimaxM2()
