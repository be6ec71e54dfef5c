"""What a model is, from its config alone: the summary behind `moekit inspect`."""

from __future__ import annotations

from pathlib import Path

from moekit.config.model import ModelConfig
from moekit.plan.model_stats import model_stats
from moekit.plan.planner import resolve_model
from moekit.plan.precision import BITS


def inspect_model(model: str | Path | ModelConfig | dict) -> dict:
    """Family, layer pattern, routing in words, attention, parameter counts, weight bytes per dtype and KV-cache
    bytes per token (bf16), JSON-ready."""
    assumptions: list[str] = []
    cfg = resolve_model(model, assumptions)
    stats = model_stats(cfg)
    p = stats.params
    moe = cfg.moe
    return {
        "name": cfg.name,
        "family": cfg.family,
        "layers": cfg.num_layers,
        "moe_layers": list(cfg.moe_layers),
        "dense_layers": [i for i in range(cfg.num_layers) if i not in cfg.moe_layers],
        "experts": moe.num_experts if moe else 0,
        "top_k": moe.top_k if moe else 0,
        "shared_experts": moe.num_shared_experts if moe else 0,
        "routing": moe.describe() if moe else "dense",
        "experts_layout": moe.layout.describe() if moe else None,
        "attention": cfg.attention.describe(),
        "heads": {"query": cfg.num_heads, "key_value": cfg.num_kv_heads, "head_dim": cfg.head_dim},
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "mtp_layers": cfg.mtp_layers,
        "params": p,
        "weight_bytes": {name: int(p["total"] * bits / 8) for name, bits in BITS.items()},
        "kv_cache_bytes_per_token_bf16": int(stats.kv_bytes_per_token(2)),
        "assumptions": assumptions,
    }
