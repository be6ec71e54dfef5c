"""IBM Granite MoE with a shared expert (`granitemoeshared`): Granite MoE (moekit.families.granitemoe) plus an
ungated shared MLP beside the routed experts (shared_mlp.input_linear [2S, D], gate rows then up rows, and
shared_mlp.output_linear [D, S]); shared_intermediate_size 0 leaves it out."""

from __future__ import annotations

from dataclasses import replace

from moekit.checkpoint.names import STACKED, Fused, TensorNames
from moekit.families.granitemoe import RENAMES, GraniteMoe

SHARED = "layers.{i}.mlp.shared_experts"


class GraniteMoeShared(GraniteMoe):
    model_type = "granitemoeshared"
    architecture = "GraniteMoeSharedForCausalLM"
    names = TensorNames(
        renames=(*RENAMES, (".shared_mlp.output_linear.", ".mlp.shared_experts.down_proj.")),
        fused=(
            Fused(
                "model.layers.{i}.shared_mlp.input_linear.weight",
                ((f"{SHARED}.gate_proj.weight", "rows"), (f"{SHARED}.up_proj.weight", "rows")),
            ),
        ),
        experts=STACKED,
    )

    def moe(self, c):
        moe, layers, dense = super().moe(c)
        width = int(c.get("shared_intermediate_size") or 0)
        return (replace(moe, num_shared_experts=1, shared_hidden=width) if width else moe), layers, dense


FAMILY = GraniteMoeShared()
