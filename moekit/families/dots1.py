"""dots.llm1 (`dots1`): DeepSeek-V3's MoE (sigmoid scores, groups, selection bias, shared experts, dense first
layers; renormalisation as norm_topk_prob says) with Qwen3's attention (QK-norm per head, full rotary), and
sliding-window layers from max_window_layers on (or as layer_types lists them)."""

from __future__ import annotations

from moekit.config.attention import AttentionConfig
from moekit.families.base import layer_types
from moekit.families.deepseek_v3 import DeepseekV3


class Dots1(DeepseekV3):
    model_type = "dots1"
    architecture = "Dots1ForCausalLM"
    write_rank = None
    mla = False
    reads_mtp = False
    gguf_arch = None

    def attention(self, c):
        n_layers, window = c["num_hidden_layers"], c.get("sliding_window")
        first_sliding = c.get("max_window_layers", n_layers)
        types = layer_types(c, n_layers) or (
            tuple("sliding" if i >= first_sliding else "full" for i in range(n_layers)) if window else None
        )
        types = types if types and "sliding" in types else None
        return AttentionConfig(
            qkv_bias=bool(c.get("attention_bias", False)),
            qk_norm="head",
            layer_types=types,
            sliding_window=window if types else None,
        )


FAMILY = Dots1()
