"""Mistral Small 4 (`mistral4`): DeepSeek-V3's MLA, shared expert and layer pattern with softmax scores chosen
within the best groups by the sum of each group's top-2 (no selection bias), renormalised and scaled, the router in
the model's dtype; every layer's queries scaled by position as Llama 4's NoPE layers are (llama_4_scaling_beta over
the original context). Its files stack each layer's experts."""

from __future__ import annotations

from dataclasses import replace

from moekit.checkpoint.names import STACKED, TensorNames
from moekit.families.base import experts_top_k
from moekit.families.deepseek_v2 import DeepseekV2
from moekit.routing.spec import RoutingSpec


class Mistral4(DeepseekV2):
    model_type = "mistral4"
    architecture = "Mistral4ForCausalLM"
    write_rank = None
    gguf_arch = None
    names = TensorNames(experts=STACKED)  # its files stack each layer's experts (gate_up_proj [E, 2F, D])

    def spec(self, c: dict) -> RoutingSpec:
        return RoutingSpec(
            *experts_top_k(c),
            n_group=c.get("n_group") or 1,
            topk_group=c.get("topk_group") or 1,
            group_score="top2_sum",
            normalize=bool(c.get("norm_topk_prob", True)),
            normalize_eps=1e-20,
            scaling_factor=float(c.get("routed_scaling_factor") or 1.0),
            router_dtype="model",
        )

    def attention(self, c):
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        beta = float(rope.get("llama_4_scaling_beta") or 0.0)
        length = int(rope.get("original_max_position_embeddings") or 1)
        return replace(super().attention(c), query_scale_beta=beta, query_scale_length=length)


FAMILY = Mistral4()
