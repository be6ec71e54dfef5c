"""How a family's checkpoints name their tensors, as data: renames, the name prefix, tensors fused from several
moekit tensors, and how routed experts are stored. The families declare these; KeyMap applies them."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Fused:
    """A checkpoint tensor made of pieces of moekit tensors: its rows are the pieces' views, each reshaped to
    [-1, last dim], stacked in order. Views: rows (the whole tensor), gate / up (the halves of a concatenated
    gate_up_proj [E, 2F, D]), transposed (down_proj [E, D, F] as [E, F, D])."""

    checkpoint: str  # with {i} for the layer
    pieces: tuple[tuple[str, str], ...]  # (moekit name with {i}, view)

    def pattern(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.checkpoint).replace(r"\{i\}", r"(\d+)") + "$")


def piece_view(tensor, view: str):
    f = tensor.shape[1] // 2 if view in ("gate", "up") else 0
    return {
        "rows": lambda t: t,
        "gate": lambda t: t[:, :f],
        "up": lambda t: t[:, f:],
        "transposed": lambda t: t.transpose(1, 2),
    }[view](tensor)


@dataclass(frozen=True)
class ExpertKeys:
    """How a family's checkpoints store routed experts: stacked 3-D tensors under the moekit names, or one 2-D
    tensor per expert and projection (gate [F, D], up [F, D], down [D, F]) inside `container`."""

    per_expert: bool
    container: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def pattern(self) -> re.Pattern:
        """Matches an expert's weight: (layer prefix, expert, projection, part suffix: '' or a quantized format's
        part beside the weight, e.g. '_scale_inv')."""
        names = "|".join(re.escape(n) for n in (self.gate, self.up, self.down))
        container = re.escape(self.container)
        return re.compile(rf"^(.*layers\.\d+)\.{container}\.experts\.(\d+)\.({names})\.weight(|_[a-z_]+)$")

    def names(self, layer_prefix: str, expert: int) -> dict[str, str]:
        """{gate|up|down: checkpoint name} of one expert of the layer whose checkpoint prefix is layer_prefix."""
        base = f"{layer_prefix}.{self.container}.experts.{expert}"
        return {
            "gate": f"{base}.{self.gate}.weight",
            "up": f"{base}.{self.up}.weight",
            "down": f"{base}.{self.down}.weight",
        }


PER_EXPERT = ExpertKeys(per_expert=True)
STACKED = ExpertKeys(per_expert=False)

# The router renames most families share (transformers' mlp.gate is moekit's mlp.router).
ROUTER = (
    (".mlp.gate.weight", ".mlp.router.weight"),
    (".mlp.gate.e_score_correction_bias", ".mlp.router.selection_bias_E"),
)


@dataclass(frozen=True)
class TensorNames:
    """renames: (checkpoint fragment, moekit fragment) applied in order (reverse order to save); a fragment starting
    with ^ renames a prefix only. prefix: the checkpoint's name prefix of everything but lm_head. fused: tensors
    made of pieces (DBRX's Wqkv and expert matrices). experts: how routed experts are stored."""

    renames: tuple[tuple[str, str], ...] = ROUTER
    prefix: str = "model."
    head: str = "lm_head."  # the output head's checkpoint prefix (DeepSeek-V4's files: head.)
    fused: tuple[Fused, ...] = ()
    experts: ExpertKeys = PER_EXPERT


SHARED_EXPERT = (".mlp.shared_expert.", ".mlp.shared_experts.")  # transformers' one shared expert, moekit's block


@dataclass(frozen=True)
class GgufArch:
    """What llama.cpp's architecture `name` computes, where it is fixed rather than read from the file (moekit
    export-gguf refuses a model that differs). renormalised: top-k weights renormalised (None: the file says);
    shared: shared experts required (gated by a sigmoid unless mla); qk_norm: moekit's qk_norm kind it applies;
    qkv_bias: q/k/v biases allowed; head_required: an output tensor even when the head is tied; full_kv_heads: no
    grouped-query attention; rope_pairs: rotates adjacent pairs (q/k rows permuted from rotate-half); mla: DeepSeek's
    MLA with leading dense layers and routing metadata; oai: GPT-OSS's clamped SwiGLU experts with biases, sinks and
    sliding-window even layers."""

    name: str
    renormalised: bool | None = None
    shared: bool = False
    qk_norm: str = "none"
    qkv_bias: bool = False
    head_required: bool = False
    full_kv_heads: bool = False
    rope_pairs: bool = False
    mla: bool = False
    oai: bool = False
