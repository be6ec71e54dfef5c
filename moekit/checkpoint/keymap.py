"""Tensor names between Hugging Face checkpoints and moekit modules, from a family's declared TensorNames: renames
only, never guessed from shapes. DeepSeek-V3's multi-token-prediction layer (model.layers.{num_layers + j}) maps
onto mtp.j."""

from __future__ import annotations

import re

from moekit.checkpoint.names import TensorNames
from moekit.config.model import ModelConfig

# The MTP layer's own parts; the rest of model.layers.{L + j} is its decoder layer.
MTP_PARTS = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "shared_head.norm": "norm"}
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the shared embedding and head


def _rename(name: str, old: str, new: str) -> str:
    if old.startswith("^"):
        return new.removeprefix("^") + name[len(old) - 1 :] if name.startswith(old[1:]) else name
    return name.replace(old, new)


class KeyMap:
    def __init__(self, cfg: ModelConfig, names: TensorNames):
        self.num_layers, self.mtp_layers = cfg.num_layers, cfg.mtp_layers
        self.rules = list(names.renames)
        self.prefix, self.fused, self.experts, self.head = names.prefix, names.fused, names.experts, names.head
        container = names.experts.container
        if container != "mlp":  # Mixtral's files name the MoE block block_sparse_moe
            self.rules = [(f".{container}.gate.", ".mlp.gate."), *self.rules]

    def to_moekit(self, hf_name: str) -> str | None:
        """The moekit name of a checkpoint tensor; None for tensors moekit keeps once elsewhere (MTP copies of the
        embedding and head)."""
        if hf_name.startswith(self.head):
            return "lm_head." + hf_name.removeprefix(self.head)
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
            return self.head + name.removeprefix("lm_head.")
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
