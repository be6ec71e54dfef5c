"""Model and MoE configurations, presets, and adapters from Hugging Face config.json."""

from moekit.config.model import ModelConfig, place_moe_layers
from moekit.config.moe import MoEConfig

__all__ = ["MoEConfig", "ModelConfig", "place_moe_layers"]
