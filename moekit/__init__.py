"""moekit: a toolkit for Mixture-of-Experts language models."""

from __future__ import annotations

from moekit import _env  # noqa: F401  (first: torch allocator settings)
from moekit.config import ModelConfig, MoEConfig
from moekit.experts import ExpertLayout
from moekit.layers.moe import MoEBlock
from moekit.model.decoder import MoEDecoder
from moekit.plan import plan  # noqa: F811 (moekit.plan(...) is the function; the package stays importable)
from moekit.routing import RoutingSpec
from moekit.version import __version__


def from_pretrained(
    path,
    dtype=None,
    quantize: str | None = None,
    expert_memory: int | str | None = None,
    expert_policy: str = "lru",
    prefetch: bool | str = "auto",
) -> MoEDecoder:
    """A Hugging Face model directory (config.json + safetensors, sharded or not) of a supported family; dtype None
    keeps the checkpoint's (torch.float32 / torch.bfloat16 / "float32" ...); quantize: the float modules quantized
    while loading, as `moekit quantize --weights` names them ("rest=q8"); what the files hold quantized stays so.
    expert_memory: the model's memory budget (bytes, or "8GB"): routed experts stay in the files and are read into
    a pool of slots in what the resident part leaves (moekit.infer.expert_cache), evicted by expert_policy (lru,
    lfu, lfu-decay), the next layer's predicted experts read ahead when prefetch (True, False, or "auto": while the
    predictions are at least half right); model.expert_cache.stats counts."""
    from moekit.checkpoint.hf_checkpoint import load_pretrained

    if expert_memory is None:
        return load_pretrained(path, dtype, quantize)
    from moekit.infer.expert_cache import install_expert_cache

    model = load_pretrained(path, dtype, quantize, experts_on_disk=True)
    install_expert_cache(model, expert_memory, expert_policy, prefetch)
    return model


def save_pretrained(model: MoEDecoder, path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write the model as a Hugging Face directory (config.json + safetensors, sharded above max_shard_bytes) that
    transformers loads, in the family's own layout; a model no family expresses in moekit's own format."""
    from moekit.checkpoint.hf_checkpoint import save_pretrained as save

    save(model, path, max_shard_bytes)


def from_config(config: ModelConfig) -> MoEDecoder:
    """A model with random weights (seed with torch.manual_seed first for reproducibility)."""
    return MoEDecoder(config)


__all__ = [
    "ExpertLayout",
    "MoEBlock",
    "MoEConfig",
    "MoEDecoder",
    "ModelConfig",
    "RoutingSpec",
    "__version__",
    "from_config",
    "from_pretrained",
    "plan",
    "save_pretrained",
]
