"""DeepSeek-V2 (`deepseek_v2`): MLA attention; softmax top-k over routed experts (greedy, or group-limited by the
best expert of each group), scaled by routed_scaling_factor, shared experts, the first layers dense."""

from __future__ import annotations

from moekit.checkpoint.names import GgufArch
from moekit.config.attention import AttentionConfig
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.families.base import Family, experts_top_k, need
from moekit.routing.spec import RoutingSpec


class DeepseekV2(Family):
    model_type = "deepseek_v2"
    gguf_arch = GgufArch("deepseek2", shared=True, qkv_bias=True, mla=True)
    architecture = "DeepseekV2ForCausalLM"
    write_rank = 1
    mla = True
    v3_routing = False  # DeepSeek-V3's sigmoid scores, groups by top-2 sums and selection bias

    def spec(self, c: dict) -> RoutingSpec:
        v3 = self.v3_routing
        grouped = v3 or c.get("topk_method") == "group_limited_greedy"
        return RoutingSpec(
            *experts_top_k(c),
            score_func=c.get("scoring_func", "sigmoid" if v3 else "softmax"),
            n_group=(c.get("n_group") or 1) if grouped else 1,
            topk_group=(c.get("topk_group") or 1) if grouped else 1,
            group_score="top2_sum" if v3 else "max",
            selection_bias=v3,
            normalize=bool(c.get("norm_topk_prob", v3)),
            normalize_eps=1e-20 if v3 else 0.0,
            scaling_factor=float(c.get("routed_scaling_factor", 1.0) or 1.0),
        )

    def moe(self, c):
        f, shared = need(c, "moe_intermediate_size"), c.get("n_shared_experts")
        moe = MoEConfig(
            routing=self.spec(c),
            expert_hidden=f,
            aux_loss_coef=0.0 if self.v3_routing else float(c.get("aux_loss_alpha") or 0.0),
            **(dict(num_shared_experts=shared, shared_hidden=shared * f) if shared else {}),
        )
        freq, first = c.get("moe_layer_freq", 1) or 1, c.get("first_k_dense_replace", 0) or 0
        layers = tuple(i for i in range(c["num_hidden_layers"]) if i >= first and i % freq == 0)
        return moe, layers, c.get("intermediate_size")

    def attention(self, c):
        bias = bool(c.get("attention_bias", False))
        return AttentionConfig(
            kind="mla",
            qkv_bias=bias,
            out_bias=bias,
            rope_interleave=bool(c.get("rope_interleave", True)),
            q_lora_rank=c.get("q_lora_rank"),
            kv_lora_rank=c["kv_lora_rank"],
            qk_nope_head_dim=c["qk_nope_head_dim"],
            qk_rope_head_dim=c["qk_rope_head_dim"],
            v_head_dim=c["v_head_dim"],
        )

    def moe_fields(self, cfg: ModelConfig) -> dict:
        """The MoE fields DeepSeek-V2/V3 and GLM-4.5 name alike."""
        moe, spec = cfg.moe, cfg.moe.routing
        return {
            "intermediate_size": cfg.dense_hidden or moe.expert_hidden,
            "moe_intermediate_size": moe.expert_hidden,
            "n_routed_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "n_shared_experts": moe.num_shared_experts,
            "routed_scaling_factor": spec.scaling_factor,
            "n_group": spec.n_group,
            "topk_group": spec.topk_group,
            "norm_topk_prob": spec.normalize,
            "first_k_dense_replace": cfg.moe_layers[0] if cfg.moe_layers else cfg.num_layers,
        }

    def mla_fields(self, cfg: ModelConfig) -> dict:
        a = cfg.attention
        return {
            "n_shared_experts": cfg.moe.num_shared_experts or None,
            "kv_lora_rank": a.kv_lora_rank,
            "q_lora_rank": a.q_lora_rank,
            "qk_rope_head_dim": a.qk_rope_head_dim,
            "qk_nope_head_dim": a.qk_nope_head_dim,
            "v_head_dim": a.v_head_dim,
            "rope_interleave": a.rope_interleave,
            "attention_bias": a.qkv_bias,
        }

    def write(self, cfg: ModelConfig) -> dict:
        spec = cfg.moe.routing
        return {
            **self.common_fields(cfg),
            **self.moe_fields(cfg),
            **self.mla_fields(cfg),
            "topk_method": "group_limited_greedy" if spec.n_group > 1 else "greedy",
            "scoring_func": spec.score_func,
            "moe_layer_freq": 1,
            "aux_loss_alpha": cfg.moe.aux_loss_coef,
        }


FAMILY = DeepseekV2()
