"""Qwen3-Next (`qwen3_next`): Qwen2-MoE's routing (softmax top-k, renormalised with norm_topk_prob; a shared expert
behind a sigmoid gate) in a hybrid stack: most layers are Gated DeltaNet linear attention (moekit.layers.
linear_attention: a recurrent state per sequence), every few a gated full attention (a sigmoid gate per head from
q_proj scales the output) with per-head QK-norm and rope on a quarter of each head; every RMSNorm but the DeltaNet's
output norm stores its weight as an offset from 1."""

from __future__ import annotations

from moekit.checkpoint.names import ROUTER, SHARED_EXPERT, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.families.base import layer_types, need, partial_rotary
from moekit.families.qwen2_moe import Qwen2Moe


class Qwen3Next(Qwen2Moe):
    model_type = "qwen3_next"
    gguf_arch = None
    architecture = "Qwen3NextForCausalLM"
    write_rank = None
    names = TensorNames(renames=(*ROUTER, SHARED_EXPERT))
    # the attention and FFN steps take plain RMSNorms (these are offset) and no linear attention
    fused_steps = frozenset({"moe"})
    norm = "rms_offset"

    def attention(self, c):
        n = c["num_hidden_layers"]
        types = layer_types(c, n)
        if types is None:  # transformers' default: every fourth layer full attention
            types = tuple(
                "full" if (i + 1) % int(c.get("full_attention_interval") or 4) == 0 else "linear" for i in range(n)
            )
        return AttentionConfig(
            qkv_bias=bool(c.get("attention_bias", False)),
            qk_norm="head",
            output_gate=True,
            partial_rotary=partial_rotary(c, 0.25),
            layer_types=types,
            linear_key_heads=need(c, "linear_num_key_heads"),
            linear_value_heads=need(c, "linear_num_value_heads"),
            linear_key_dim=need(c, "linear_key_head_dim"),
            linear_value_dim=need(c, "linear_value_head_dim"),
            linear_conv=int(c.get("linear_conv_kernel_dim") or 4),
        )


FAMILY = Qwen3Next()
