"""Qwen3.5 MoE (`qwen3_5_moe_text`, or inside its multimodal wrapper `qwen3_5_moe`): Qwen3-Next's hybrid stack
(moekit.families.qwen3_next) with the Gated DeltaNet's projections split (q, k and v in one tensor, then z, b and
a apart) and the top-k weights always renormalised. Its rope is multimodal (sections of each head's rotary
dimensions follow time, height and width); on text the three positions agree and it is the plain rope. moekit
runs the language model: the vision tower and the multi-token-prediction module are not loaded, and saving writes
the text model alone (Qwen3_5MoeForCausalLM)."""

from __future__ import annotations

from dataclasses import replace

from moekit.families.qwen3_next import Qwen3Next

WRAPPER_ONLY = ("text_config", "vision_config")


class Qwen35Moe(Qwen3Next):
    model_type = "qwen3_5_moe_text"
    aliases = ("qwen3_5_moe",)
    architecture = "Qwen3_5MoeForCausalLM"

    def language_model(self, hf: dict) -> dict:
        if "text_config" not in hf:
            return hf
        keep = {k: v for k, v in self.fields(hf).items() if k not in WRAPPER_ONLY}
        keep.setdefault("tie_word_embeddings", bool(hf.get("tie_word_embeddings", False)))
        return {**keep, "model_type": self.model_type, "architectures": [self.architecture]}

    def tensor_name(self, hf: dict, stored: str) -> str | None:
        if stored.startswith(("mtp.", "model.visual.")):  # the MTP module and the vision tower: not loaded
            return None
        return "model." + stored.removeprefix("model.language_model.") if "language_model." in stored else stored

    def moe(self, c):
        moe, layers, dense = super().moe({**c, "norm_topk_prob": True})  # always renormalised
        return moe, layers, dense

    def attention(self, c):
        return replace(super().attention(c), linear_projection="split")


FAMILY = Qwen35Moe()
