"""GLM-5 (`glm_moe_dsa`): DeepSeek-V3.2's architecture (MLA, DeepSeek Sparse Attention, DeepSeek-V3 routing) with
an interleaved rope in the indexer and layers that reuse the previous indexer layer's pick (indexer_types
`shared`, or as index_topk_pattern / index_topk_freq and index_skip_topk_offset derive them)."""

from __future__ import annotations

from moekit.families.deepseek_v32 import DeepseekV32


class GlmMoeDsa(DeepseekV32):
    model_type = "glm_moe_dsa"
    architecture = "GlmMoeDsaForCausalLM"
    index_rope_interleave = True

    def shared_layers(self, c: dict) -> tuple[int, ...]:
        n = c["num_hidden_layers"]
        kinds = c.get("indexer_types")
        pattern = c.get("index_topk_pattern")
        if kinds is None and pattern is not None:
            kinds = [{"F": "full", "S": "shared"}[p] for p in pattern] if isinstance(pattern, str) else pattern
        if kinds is None:
            freq, offset = max(c.get("index_topk_freq") or 1, 1), c.get("index_skip_topk_offset", 2)
            kinds = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
        return tuple(i for i, k in enumerate(kinds) if k == "shared")


FAMILY = GlmMoeDsa()
