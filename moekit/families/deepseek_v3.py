"""DeepSeek-V3 (`deepseek_v3`, also Kimi K2): DeepSeek-V2's MLA and layer pattern; sigmoid scores, top-k within the
best groups by the sum of each group's top-2, a selection-only bias (the auxiliary-loss-free balancer),
renormalised and scaled; multi-token-prediction layers after the main ones."""

from __future__ import annotations

from moekit.checkpoint.names import GgufArch
from moekit.config.model import ModelConfig
from moekit.families.deepseek_v2 import DeepseekV2


class DeepseekV3(DeepseekV2):
    model_type = "deepseek_v3"
    gguf_arch = GgufArch("deepseek2", shared=True, qkv_bias=True, mla=True)
    architecture = "DeepseekV3ForCausalLM"
    write_rank = 0
    v3_routing = True
    reads_mtp = True

    def write(self, cfg: ModelConfig) -> dict:
        return {
            **self.common_fields(cfg),
            **self.moe_fields(cfg),
            **self.mla_fields(cfg),
            "num_nextn_predict_layers": cfg.mtp_layers,
        }


FAMILY = DeepseekV3()
