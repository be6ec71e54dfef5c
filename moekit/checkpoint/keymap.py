"""Declared tensor-name maps between Hugging Face checkpoints and moekit modules: renames only, per family, never
guessed from shapes. DeepSeek-V3's multi-token-prediction layer (model.layers.{num_layers + j}) maps onto mtp.j."""

from __future__ import annotations

import re
from dataclasses import dataclass

from moekit.config.model import ModelConfig

# (Hugging Face fragment, moekit fragment): plain renames applied in order (reverse order to save).
ROUTER = [
    (".mlp.gate.weight", ".mlp.router.weight"),
    (".mlp.gate.e_score_correction_bias", ".mlp.router.selection_bias_E"),
]
SHARED_EXPERT = [(".mlp.shared_expert.", ".mlp.shared_experts.")]
RENAMES = {
    "qwen2_moe": ROUTER + SHARED_EXPERT,
    "llama4_text": [(".feed_forward.", ".mlp."), *SHARED_EXPERT],
    "gpt_oss": [],  # already mlp.router.*
}

# The MTP layer's own parts; the rest of model.layers.{L + j} is its decoder layer.
MTP_PARTS = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "shared_head.norm": "norm"}
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the shared embedding and head


class KeyMap:
    def __init__(self, cfg: ModelConfig):
        self.num_layers, self.mtp_layers = cfg.num_layers, cfg.mtp_layers
        self.rules = RENAMES.get(cfg.family, ROUTER)
        container = EXPERT_KEYS.get(cfg.family, PER_EXPERT).container
        if container != "mlp":  # Mixtral's files name the MoE block block_sparse_moe
            self.rules = [(f".{container}.gate.", ".mlp.gate."), *self.rules]

    def to_moekit(self, hf_name: str) -> str | None:
        """The moekit name of a checkpoint tensor; None for tensors moekit keeps once elsewhere (MTP copies of the
        embedding and head)."""
        name = hf_name.removeprefix("model.")
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if m and int(m[1]) >= self.num_layers:
            j, rest = int(m[1]) - self.num_layers, m[2]
            if rest in MTP_COPIES:
                return None
            part = next((p for p in MTP_PARTS if rest.startswith(p + ".")), None)
            name = f"mtp.{j}.{MTP_PARTS[part]}{rest[len(part) :]}" if part else f"mtp.{j}.layer.{rest}"
        if name.startswith("lm_head."):
            return name
        for hf, ours in self.rules:
            name = name.replace(hf, ours)
        return name

    def to_hf(self, name: str) -> str:
        """The checkpoint name of a moekit tensor (the inverse of to_moekit)."""
        if name.startswith("lm_head."):
            return name
        m = re.match(r"mtp\.(\d+)\.(.*)", name)
        if m:
            j, rest = int(m[1]), m[2]
            inverse = {v: k for k, v in MTP_PARTS.items()}
            part = next((p for p in inverse if rest.startswith(p + ".")), None)
            rest = inverse[part] + rest[len(part) :] if part else rest.removeprefix("layer.")
            name = f"layers.{self.num_layers + j}.{rest}"
        for hf, ours in reversed(self.rules):
            name = name.replace(ours, hf)
        return "model." + name

    def mtp_copies(self) -> list[str]:
        """Checkpoint names of the embedding/head copies stored beside each MTP layer."""
        return [f"model.layers.{self.num_layers + j}.{c}" for j in range(self.mtp_layers) for c in MTP_COPIES]


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
        names = "|".join(re.escape(n) for n in (self.gate, self.up, self.down))
        return re.compile(rf"^(.*layers\.\d+)\.{re.escape(self.container)}\.experts\.(\d+)\.({names})\.weight$")

    def names(self, layer_prefix: str, expert: int) -> dict[str, str]:
        """{gate|up|down: checkpoint name} of one expert of the layer whose checkpoint prefix is layer_prefix."""
        base = f"{layer_prefix}.{self.container}.experts.{expert}"
        return {
            "gate": f"{base}.{self.gate}.weight",
            "up": f"{base}.{self.up}.weight",
            "down": f"{base}.{self.down}.weight",
        }


PER_EXPERT = ExpertKeys(per_expert=True)
EXPERT_KEYS = {
    "mixtral": ExpertKeys(per_expert=True, container="block_sparse_moe", gate="w1", up="w3", down="w2"),
    "phimoe": ExpertKeys(per_expert=True, container="block_sparse_moe", gate="w1", up="w3", down="w2"),
    "gpt_oss": ExpertKeys(per_expert=False),
    "llama4_text": ExpertKeys(per_expert=False),
}


def expert_keys(family: str) -> ExpertKeys:
    return EXPERT_KEYS.get(family, PER_EXPERT)
