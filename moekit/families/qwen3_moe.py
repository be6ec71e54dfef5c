"""Qwen3-MoE (`qwen3_moe`): Qwen2-MoE's routing without the shared expert, QK-norm per head, no qkv biases unless
attention_bias."""

from __future__ import annotations

from moekit.checkpoint.names import GgufArch, TensorNames
from moekit.families.qwen2_moe import Qwen2Moe


class Qwen3Moe(Qwen2Moe):
    model_type = "qwen3_moe"
    gguf_arch = GgufArch("qwen3moe", renormalised=True, qk_norm="head")
    architecture = "Qwen3MoeForCausalLM"
    write_rank = 3
    names = TensorNames()
    shared_expert = False
    qk_norm = "head"


FAMILY = Qwen3Moe()
