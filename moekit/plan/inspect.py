"""What a model is, from its config alone: the summary behind `moekit inspect`."""

from __future__ import annotations

import math
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
        "table_layers": list(cfg.table_layers),
        "hyper_streams": cfg.hyper_streams,
        "params": p,
        "weight_bytes": {name: int(p["total"] * bits / 8) for name, bits in BITS.items()},
        "kv_cache_bytes_per_token_bf16": int(stats.kv_bytes_per_token(2)),
        "recurrent_state_bytes_per_sequence_bf16": int(stats.state_elements * 2),
        "stored": _stored(model),
        "assumptions": assumptions,
    }


def _stored(model) -> dict | None:
    """What a model directory's files hold: their tensor bytes and the quantized formats they declare."""
    if not isinstance(model, (str, Path)) or not Path(model).is_dir():
        return None
    from moekit.checkpoint.files import Shards, checkpoint_dir, weight_map
    from moekit.checkpoint.quantized import scheme_of
    from moekit.config.published import load_hf_config

    path = checkpoint_dir(model)
    try:
        shards = Shards(weight_map(path))
    except ValueError:
        return None  # a config without weights
    held = sum(math.prod(shards.shape(n)) * shards.dtype(n).itemsize for n in shards.files)
    scheme = scheme_of(load_hf_config(path), shards)
    formats = sorted({fmt.name for fmt, _ in scheme.groups}) if scheme else []
    return {"bytes": held, "quantized": formats}
