"""DeepSeek-V3.2 (`deepseek_v32`): DeepSeek-V3 with DeepSeek Sparse Attention: a lightning indexer per layer
(rope on the first dimensions of its heads, split halves) picks the index_topk keys each query's MLA attends to;
dense layers as mlp_layer_types lists them (default: the first first_k_dense_replace)."""

from __future__ import annotations

from dataclasses import replace

from moekit.families.base import listed_moe_layers
from moekit.families.deepseek_v3 import DeepseekV3


class DeepseekV32(DeepseekV3):
    model_type = "deepseek_v32"
    architecture = "DeepseekV32ForCausalLM"
    write_rank = None
    gguf_arch = None
    index_rope_interleave = False

    def moe(self, c):
        moe, layers, dense = super().moe(c)
        listed = listed_moe_layers(c)
        return moe, layers if listed is None else listed, dense

    def attention(self, c):
        return replace(
            super().attention({**c, "rope_interleave": True}),  # MLA's rope is always interleaved here
            index_topk=c["index_topk"],
            index_heads=c["index_n_heads"],
            index_head_dim=c["index_head_dim"],
            index_rope_interleave=self.index_rope_interleave,
            index_shared_layers=self.shared_layers(c),
        )

    def shared_layers(self, c: dict) -> tuple[int, ...]:
        """Layers that reuse the previous indexer layer's pick instead of running their own."""
        return ()


FAMILY = DeepseekV32()
