"""Kimi K2, K2.5 and K2.6 (`kimi_k25`: a multimodal wrapper whose text_config says `kimi_k2`; or `kimi_k2` alone):
DeepSeek-V3's architecture. moekit runs the language model: the text config is read as DeepSeek-V3 and the
language model's tensors under DeepSeek-V3's names; the vision tower and its projector are not loaded, and saving
writes the language model alone (a DeepseekV3ForCausalLM directory transformers loads)."""

from __future__ import annotations

from moekit.config.model import ModelConfig
from moekit.families.base import Family
from moekit.families.deepseek_v3 import FAMILY as DEEPSEEK_V3

WRAPPER_ONLY = ("auto_map", "text_config", "vision_config")


class KimiK25(Family):
    model_type = "kimi_k25"
    aliases = ("kimi_k2",)
    fused_steps = DEEPSEEK_V3.fused_steps
    mla = True

    def language_model(self, hf: dict) -> dict:
        keep = {k: v for k, v in self.fields(hf).items() if k not in WRAPPER_ONLY}
        if "text_config" in hf:  # the wrapper ties the head to the embedding (transformers' default: tied)
            keep["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", True))
        return {**keep, "model_type": DEEPSEEK_V3.model_type, "architectures": [DEEPSEEK_V3.architecture]}

    def tensor_name(self, hf: dict, stored: str) -> str | None:
        if "text_config" not in hf:  # kimi_k2 alone: DeepSeek-V3's names
            return stored
        if not stored.startswith("language_model."):  # the vision tower and projector
            return None
        name = stored.removeprefix("language_model.")  # transformers saves the layers as blocks
        return "model.layers." + name.removeprefix("model.blocks.") if name.startswith("model.blocks.") else name

    def read(self, hf: dict, name: str = "") -> ModelConfig:
        return DEEPSEEK_V3.read(self.language_model(hf), name)

    def moe(self, c):
        return DEEPSEEK_V3.moe(c)

    def attention(self, c):
        return DEEPSEEK_V3.attention(c)


FAMILY = KimiK25()
