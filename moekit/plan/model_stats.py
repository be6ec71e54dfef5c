"""What the planner needs to know about a model, read off the model moekit builds on the `meta` device (no
memory): parameter counts by part, the MoE layers' shapes, the KV cache per token, the attention FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.config.model import ModelConfig
from moekit.model.count import count_parameters
from moekit.model.meta import meta_model


@dataclass(frozen=True)
class MoELayerShape:
    num_experts: int
    top_k: int
    params_per_expert: int


@dataclass(frozen=True)
class KVLayer:
    """One cache of one layer: the elements of an entry, one entry per `every` tokens (DeepSeek-V4's compressed
    entries; else every token), and how many entries it keeps (window; None: all)."""

    elements_per_token: int
    window: int | None
    every: int = 1

    def kept(self, context: int) -> int:
        """Entries this cache holds (and attention reads) at `context` tokens."""
        entries = context // self.every
        return entries if self.window is None else min(entries, self.window)


@dataclass(frozen=True)
class ModelStats:
    config: ModelConfig
    params: dict[str, int]
    moe_layers: tuple[MoELayerShape, ...]
    kv_layers: tuple[KVLayer, ...]
    attention_flops_per_key: int  # FLOPs per query token per cached key, in one layer
    state_elements: int = 0  # recurrent layers' state per sequence, whatever its length (linear attention)

    @property
    def always_read_params(self) -> int:
        """Weights every decode step reads whatever the routing: all but routed experts and the embedding table
        (a step reads one row of it per token)."""
        return self.params["total"] - self.params["routed_experts"] - self.params["embedding"]

    def kv_bytes_per_token(self, kv_bytes: float) -> float:
        """Bytes one more token adds to the cache when every layer still keeps it (windows not yet full)."""
        return sum(layer.elements_per_token / layer.every for layer in self.kv_layers) * kv_bytes

    def kv_bytes_per_sequence(self, context: int, kv_bytes: float) -> float:
        """Cache bytes of one sequence at `context` tokens: windowed layers keep at most their window, recurrent
        layers their fixed state."""
        entries = sum(layer.elements_per_token * layer.kept(context) for layer in self.kv_layers)
        return (entries + self.state_elements) * kv_bytes


def model_stats(cfg: ModelConfig) -> ModelStats:
    model = meta_model(cfg)
    params = count_parameters(model)
    moe = tuple(
        MoELayerShape(
            b.cfg.num_experts, b.cfg.top_k, sum(p.numel() for p in b.experts.parameters()) // b.cfg.num_experts
        )
        for i, b in model.moe_blocks().items()
        if i < cfg.num_layers
    )
    a = cfg.attention
    if a.kind == "mla":
        indexed = [bool(a.index_topk) and i not in a.index_shared_layers for i in range(cfg.num_layers)]
        per_token = [a.kv_lora_rank + a.qk_rope_head_dim + a.index_head_dim * k for k in indexed]  # DSA: its keys
        flops_per_key = 2 * cfg.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    elif a.kind == "compressed":  # one K = V head over the window, plus the compressed entries (and their index)
        return ModelStats(cfg, params, moe, _compressed_cache(cfg), 2 * cfg.num_heads * 2 * cfg.head_dim)
    else:
        per_token = [cfg.kv_heads(i) * (cfg.head_dim + cfg.value_dim) for i in range(cfg.num_layers)]
        flops_per_key = 2 * cfg.num_heads * (cfg.head_dim + cfg.value_dim)
    windows = {"full": None, "sliding": a.sliding_window, "chunked": a.chunk_size}
    linear = set(a.linear_layers)
    kv = tuple(KVLayer(per_token[i], windows[a.layer_type(i)]) for i in range(cfg.num_layers) if i not in linear)
    return ModelStats(cfg, params, moe, kv, flops_per_key, sum(_state_elements(cfg, a.layer_type(i)) for i in linear))


def _state_elements(cfg: ModelConfig, kind: str) -> int:
    """A recurrent layer's state per sequence: Gated DeltaNet's [value heads, key dim, value dim] or Mamba's
    [inner, state size] (Mamba-2: heads x head dim = inner), each beside its convolution's last kernel - 1 inputs."""
    a = cfg.attention
    inner = a.mamba_expand * cfg.hidden_size
    if kind == "mamba":
        return inner * a.mamba_state + inner * (a.mamba_conv - 1)
    if kind == "mamba2":  # [heads, head dim, state] = [inner, state]; the convolution runs over x, B and C
        return inner * a.mamba_state + (inner + 2 * a.mamba_groups * a.mamba_state) * (a.mamba_conv - 1)
    conv = 2 * a.linear_key_heads * a.linear_key_dim + a.linear_value_heads * a.linear_value_dim
    return a.linear_value_heads * a.linear_key_dim * a.linear_value_dim + conv * (a.linear_conv - 1)


def _compressed_cache(cfg: ModelConfig) -> tuple[KVLayer, ...]:
    """DeepSeek-V4's cache per layer: the window's K = V rows, and on compressed layers one head_dim entry plus one
    index_head_dim indexer key per compress_rate tokens, on heavily compressed ones one entry per
    heavy_compress_rate tokens (the unfinished window's few rows left out)."""
    a, out = cfg.attention, []
    for i in range(cfg.num_layers):
        out.append(KVLayer(cfg.head_dim, a.sliding_window))
        kind = a.layer_type(i)
        if kind == "compressed":
            out.append(KVLayer(cfg.head_dim + a.index_head_dim, None, a.compress_rate))
        elif kind == "heavily_compressed":
            out.append(KVLayer(cfg.head_dim, None, a.heavy_compress_rate))
    return tuple(out)
