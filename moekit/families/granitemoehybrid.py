"""IBM Granite 4.0-H (`granitemoehybrid`): Granite MoE with its shared MLP (moekit.families.granitemoeshared, muP
included) in a hybrid stack: Mamba-2 layers (moekit.layers.mamba.Mamba2Mixer; the config calls them
linear_attention) and attention layers with rope or none (position_embedding_type)."""

from __future__ import annotations

from dataclasses import replace

from moekit.families.base import need
from moekit.families.granitemoeshared import GraniteMoeShared


def _number(x) -> float:
    """A float as config.json holds it ({"__float__": "Infinity"}: transformers' spelling of infinities)."""
    return float(x["__float__"]) if isinstance(x, dict) else float(x)


class GraniteMoeHybrid(GraniteMoeShared):
    model_type = "granitemoehybrid"
    architecture = "GraniteMoeHybridForCausalLM"

    def moe(self, c):
        if not c.get("num_local_experts"):
            raise ValueError("granitemoehybrid: num_local_experts=0 (no MoE layer) is unsupported: allowed an MoE")
        moe, layers, dense = super().moe({**c, "shared_intermediate_size": need(c, "shared_intermediate_size")})
        return moe, layers, dense

    def attention(self, c):
        n = c["num_hidden_layers"]
        kinds = c.get("layer_types") or c.get("layers_block_type") or ["linear_attention"] * n
        types = tuple("mamba2" if k in ("linear_attention", "mamba") else "full" for k in kinds)
        expand, heads = int(c.get("mamba_expand") or 2), int(need(c, "mamba_n_heads"))
        limit = [_number(x) for x in c.get("time_step_limit") or (0.0, float("inf"))]
        if limit[0] > 0.0 or limit[1] != float("inf"):
            raise ValueError(f"granitemoehybrid: time_step_limit={list(limit)} is unsupported: allowed none")
        rope = c.get("position_embedding_type") == "rope"
        return replace(
            super().attention(c),
            layer_types=types,
            nope_layers=() if rope else tuple(i for i, t in enumerate(types) if t == "full"),
            mamba_state=int(need(c, "mamba_d_state")),
            mamba_conv=int(c.get("mamba_d_conv") or 4),
            mamba_expand=expand,
            mamba_heads=heads,
            mamba_groups=int(c.get("mamba_n_groups") or 1),
            mamba_chunk=int(c.get("mamba_chunk_size") or 256),
            mamba_conv_bias=bool(c.get("mamba_conv_bias", True)),
            mamba_proj_bias=bool(c.get("mamba_proj_bias", False)),
        )


FAMILY = GraniteMoeHybrid()
