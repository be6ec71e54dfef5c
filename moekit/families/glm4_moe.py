"""GLM-4.5 (`glm4_moe`): DeepSeek-V3's routing and layer pattern with grouped-query attention, partial rotary
embedding (half the head by default), optional QK-norm per head, multi-token-prediction layers."""

from __future__ import annotations

from moekit.config.attention import AttentionConfig
from moekit.config.model import ModelConfig
from moekit.families.base import partial_rotary
from moekit.families.deepseek_v3 import DeepseekV3


class Glm4Moe(DeepseekV3):
    model_type = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    write_rank = 2
    mla = False

    def attention(self, c):
        return AttentionConfig(
            qkv_bias=bool(c.get("attention_bias", False)),
            qk_norm="head" if c.get("use_qk_norm") else "none",
            partial_rotary=partial_rotary(c, 0.5),
        )

    def write(self, cfg: ModelConfig) -> dict:
        a = cfg.attention
        d = {**self.common_fields(cfg), **self.moe_fields(cfg)}
        d["rope_parameters"]["partial_rotary_factor"] = a.partial_rotary
        d.update(
            head_dim=cfg.head_dim,
            partial_rotary_factor=a.partial_rotary,
            use_qk_norm=a.qk_norm == "head",
            attention_bias=a.qkv_bias,
            num_nextn_predict_layers=cfg.mtp_layers,
        )
        return d


FAMILY = Glm4Moe()
