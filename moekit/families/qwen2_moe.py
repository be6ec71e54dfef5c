"""Qwen1.5/Qwen2-MoE (`qwen2_moe`): softmax top-k (renormalised only with norm_topk_prob), a shared expert behind a
sigmoid gate, qkv biases, MoE layers every decoder_sparse_step except mlp_only_layers."""

from __future__ import annotations

from moekit.checkpoint.names import ROUTER, SHARED_EXPERT, GgufArch, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.model import ModelConfig, place_moe_layers
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, aux_loss_coef, experts_top_k, layer_types, need
from moekit.routing.spec import RoutingSpec


class Qwen2Moe(Family):
    model_type = "qwen2_moe"
    gguf_arch = GgufArch("qwen2moe", renormalised=False, shared=True, qkv_bias=True, head_required=True)
    architecture = "Qwen2MoeForCausalLM"
    write_rank = 4
    names = TensorNames(renames=(*ROUTER, SHARED_EXPERT))
    shared_expert = True
    qk_norm = "none"

    def moe(self, c):
        n_layers = c["num_hidden_layers"]
        spec = RoutingSpec(
            *experts_top_k(c),
            normalize=bool(c.get("norm_topk_prob", False)),
        )
        shared = c.get("shared_expert_intermediate_size") if self.shared_expert else None
        moe = MoEConfig(
            routing=spec,
            expert_hidden=need(c, "moe_intermediate_size"),
            aux_loss_coef=aux_loss_coef(c),
            **(dict(num_shared_experts=1, shared_hidden=shared, shared_gate=True) if shared else {}),
        )
        step = c.get("decoder_sparse_step", 1) or 1
        layers = place_moe_layers(n_layers, step=step, dense_layers=tuple(c.get("mlp_only_layers") or ()))
        return moe, layers, c.get("intermediate_size")

    def attention(self, c):
        n_layers, window, types = c["num_hidden_layers"], c.get("sliding_window") or None, None
        if c.get("use_sliding_window") and window:
            max_window = c.get("max_window_layers", n_layers)
            types = layer_types(c, n_layers) or tuple("sliding" if i < max_window else "full" for i in range(n_layers))
        bias = self.qk_norm == "none" or bool(c.get("attention_bias", False))  # Qwen2-MoE always has qkv biases
        return AttentionConfig(
            qkv_bias=bias, qk_norm=self.qk_norm, layer_types=types, sliding_window=window if types else None
        )

    def write(self, cfg: ModelConfig) -> dict:
        moe = cfg.moe
        d = {
            **self.common_fields(cfg),
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.dense_hidden or moe.expert_hidden,
            "moe_intermediate_size": moe.expert_hidden,
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "norm_topk_prob": moe.routing.normalize,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg.num_layers) if i not in cfg.moe_layers],
            "router_aux_loss_coef": moe.aux_loss_coef,
            "output_router_logits": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_bias": cfg.attention.qkv_bias and self.qk_norm != "none",
        }
        if self.shared_expert:
            d["shared_expert_intermediate_size"] = moe.shared_width
            d["qkv_bias"] = True
        return d


FAMILY = Qwen2Moe()
