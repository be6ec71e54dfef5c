"""Declared tensor-name maps between Hugging Face checkpoints and moekit modules: renames only, per family, never
guessed from shapes. DeepSeek-V3's multi-token-prediction layer (model.layers.{num_layers + j}) maps onto mtp.j."""

from __future__ import annotations

import re
from dataclasses import dataclass

from moekit.config.model import ModelConfig

# (Hugging Face fragment, moekit fragment): plain renames applied in order (reverse order to save); a fragment
# starting with ^ renames a prefix only.
ROUTER = [
    (".mlp.gate.weight", ".mlp.router.weight"),
    (".mlp.gate.e_score_correction_bias", ".mlp.router.selection_bias_E"),
]
SHARED_EXPERT = [(".mlp.shared_expert.", ".mlp.shared_experts.")]
RENAMES = {
    "qwen2_moe": ROUTER + SHARED_EXPERT,
    "llama4_text": [(".feed_forward.", ".mlp."), *SHARED_EXPERT],
    "gpt_oss": [],  # already mlp.router.*
    "dbrx": [
        ("^transformer.wte.", "^embed_tokens."),
        ("^transformer.norm_f.", "^norm."),
        ("^transformer.blocks.", "^layers."),
        (".norm_attn_norm.norm_1.", ".input_layernorm."),
        (".norm_attn_norm.norm_2.", ".post_attention_layernorm."),
        (".norm_attn_norm.attn.out_proj.", ".self_attn.o_proj."),
        (".ffn.router.layer.", ".mlp.router."),
    ],
}
PREFIX = {"dbrx": ""}  # the checkpoint's name prefix of everything but lm_head (default "model.")


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


FUSED = {
    "dbrx": (
        Fused(
            "transformer.blocks.{i}.norm_attn_norm.attn.Wqkv.weight",
            tuple((f"layers.{{i}}.self_attn.{p}_proj.weight", "rows") for p in "qkv"),
        ),
        Fused("transformer.blocks.{i}.ffn.experts.mlp.w1", (("layers.{i}.mlp.experts.gate_up_proj", "gate"),)),
        Fused("transformer.blocks.{i}.ffn.experts.mlp.v1", (("layers.{i}.mlp.experts.gate_up_proj", "up"),)),
        Fused("transformer.blocks.{i}.ffn.experts.mlp.w2", (("layers.{i}.mlp.experts.down_proj", "transposed"),)),
    )
}

# The MTP layer's own parts; the rest of model.layers.{L + j} is its decoder layer.
MTP_PARTS = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "shared_head.norm": "norm"}
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the shared embedding and head


def _rename(name: str, old: str, new: str) -> str:
    if old.startswith("^"):
        return new.removeprefix("^") + name[len(old) - 1 :] if name.startswith(old[1:]) else name
    return name.replace(old, new)


class KeyMap:
    def __init__(self, cfg: ModelConfig):
        self.num_layers, self.mtp_layers = cfg.num_layers, cfg.mtp_layers
        self.rules = RENAMES.get(cfg.family, ROUTER)
        self.prefix = PREFIX.get(cfg.family, "model.")
        self.fused = FUSED.get(cfg.family, ())
        container = EXPERT_KEYS.get(cfg.family, PER_EXPERT).container
        if container != "mlp":  # Mixtral's files name the MoE block block_sparse_moe
            self.rules = [(f".{container}.gate.", ".mlp.gate."), *self.rules]

    def to_moekit(self, hf_name: str) -> str | None:
        """The moekit name of a checkpoint tensor; None for tensors moekit keeps once elsewhere (MTP copies of the
        embedding and head)."""
        if hf_name.startswith("lm_head."):
            return hf_name
        name = hf_name.removeprefix(self.prefix)
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if m and int(m[1]) >= self.num_layers:
            j, rest = int(m[1]) - self.num_layers, m[2]
            if rest in MTP_COPIES:
                return None
            part = next((p for p in MTP_PARTS if rest.startswith(p + ".")), None)
            name = f"mtp.{j}.{MTP_PARTS[part]}{rest[len(part) :]}" if part else f"mtp.{j}.layer.{rest}"
        for hf, ours in self.rules:
            name = _rename(name, hf, ours)
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
            name = _rename(name, ours, hf)
        return self.prefix + name

    def fused_pieces(self, hf_name: str) -> list[tuple[str, str]] | None:
        """[(moekit name, view)] when the checkpoint tensor is fused (DBRX's Wqkv and expert matrices)."""
        for rule in self.fused:
            m = rule.pattern().match(hf_name)
            if m:
                return [(name.format(i=m[1]), view) for name, view in rule.pieces]
        return None

    def fused_names(self) -> dict[str, list[tuple[str, str]]]:
        """{checkpoint name: pieces} of every fused tensor of the model, for saving."""
        return {
            rule.checkpoint.format(i=i): [(name.format(i=i), view) for name, view in rule.pieces]
            for rule in self.fused
            for i in range(self.num_layers)
        }

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
    "dbrx": ExpertKeys(per_expert=False),  # fused [E*F, D] matrices, see FUSED
    "llama4_text": ExpertKeys(per_expert=False),
}


def expert_keys(family: str) -> ExpertKeys:
    return EXPERT_KEYS.get(family, PER_EXPERT)
