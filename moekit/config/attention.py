"""The attention of a decoder layer as data: grouped-query or multi-head latent (MLA), norms, sinks, windows, rope."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moekit._validate import check_choice, check_float, check_int, fail

ATTENTION_KINDS = ("gqa", "mla", "compressed")
QK_NORMS = ("none", "head", "head_after_rope", "full", "l2")
LAYER_TYPES = ("full", "sliding", "chunked", "compressed", "heavily_compressed", "linear", "mamba", "mamba2")
RECURRENT = ("linear", "mamba", "mamba2")  # layer types with a state per sequence instead of a KV cache
ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """Context extension of the rotary embedding, as in Hugging Face's rope_scaling / rope_parameters.

    yarn: factor, original_max_position, beta_fast, beta_slow, mscale, mscale_all_dim, truncate (DeepSeek also
    scales the softmax by mscale(factor, mscale_all_dim)^2, GPT-OSS does not: its mscale_all_dim is 0).
    llama3: factor, low_freq_factor, high_freq_factor, original_max_position. linear: factor.
    longrope (Phi-3): per-frequency short_factor / long_factor, the long ones once a sequence outgrows
    original_max_position, with short_mscale / long_mscale (default sqrt(1 + ln(factor) / ln(original)))."""

    type: Literal["default", "linear", "yarn", "llama3"] = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    short_mscale: float | None = None
    long_mscale: float | None = None

    def __post_init__(self) -> None:
        check_choice("rope_scaling.type", self.type, ROPE_TYPES)
        check_float("rope_scaling.factor", self.factor, 0.0, lo_open=True)
        object.__setattr__(self, "short_factor", tuple(float(x) for x in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(x) for x in self.long_factor))
        if self.type == "longrope" and (not self.short_factor or len(self.short_factor) != len(self.long_factor)):
            fail(
                "rope_scaling.short_factor", len(self.short_factor), "one factor per frequency, as many as long_factor"
            )
        if self.type in ("yarn", "llama3", "longrope") and self.original_max_position is None:
            fail("rope_scaling.original_max_position", None, f"an integer >= 1 for {self.type} scaling")

    @classmethod
    def from_hf(cls, d: dict | None, max_position: int | None = None) -> RopeScaling | None:
        if not d:
            return None
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "su":  # Phi-3's early name for longrope
            kind = "longrope"
        if kind == "default":
            return None
        if kind not in ROPE_TYPES:
            fail("rope_scaling.type", kind, f"one of {', '.join(ROPE_TYPES)}")
        get = lambda k, default: default if d.get(k) is None else d[k]
        factor = d.get("factor")
        if factor is None and kind == "longrope" and max_position and d.get("original_max_position_embeddings"):
            factor = max_position / d["original_max_position_embeddings"]
        return cls(
            type=kind,
            factor=float(factor if factor is not None else 1.0),
            original_max_position=d.get("original_max_position_embeddings"),
            beta_fast=float(get("beta_fast", 32.0)),
            beta_slow=float(get("beta_slow", 1.0)),
            mscale=float(get("mscale", 0.0)),
            mscale_all_dim=float(get("mscale_all_dim", 0.0)),
            truncate=bool(get("truncate", True)),
            low_freq_factor=float(get("low_freq_factor", 1.0)),
            high_freq_factor=float(get("high_freq_factor", 4.0)),
            short_factor=tuple(d.get("short_factor") or ()),
            long_factor=tuple(d.get("long_factor") or ()),
            short_mscale=d.get("short_mscale"),
            long_mscale=d.get("long_mscale"),
        )


@dataclass(frozen=True)
class AttentionConfig:
    """kind            gqa (grouped-query; MHA when kv heads = heads), mla (DeepSeek's multi-head latent attention:
                    the cache holds one kv_lora_rank latent plus one shared qk_rope_head_dim key per token) or
                    compressed (DeepSeek-V4: one K = V head over a sliding window with sinks, plus, on compressed
                    layers, one entry per compress_rate tokens picked by an indexer, and on heavily compressed
                    layers one per heavy_compress_rate tokens; q-LoRA; output projected in o_groups groups of
                    o_lora_rank; rope on the last partial_rotary of each head).
    qkv_bias, out_bias  biases of the q/k/v projections and of the output projection.
    qk_norm         none, head (RMSNorm per head: Qwen3), head_after_rope (the same after rope: Hunyuan), full
                    (RMSNorm over the whole q / k projection: OLMoE), l2 (weightless L2 norm after rope, on rope
                    layers: Llama 4).
    clip_qkv        clamp q, k, v to ±clip_qkv (OLMoE).
    sinks           a learned per-head logit that absorbs attention mass (GPT-OSS); sink_layers: on all layers or on
                    the sliding-window ones only (MiMo-V2-Flash).
    layer_types     per layer full / sliding (window sliding_window) / chunked (chunk_size); None: all full.
    sliding_kv_heads, sliding_rope_theta  the key/value heads and the rope theta of sliding layers where they
                    differ from the full layers' (MiMo-V2-Flash); None: the same.
    value_scale     values multiplied by a constant before attention (MiMo-V2-Flash); v_head_dim, for GQA, a
                    value head width other than the query/key head's (0: the same).
    nope_layers     layers without rotary embedding (Llama 4); temperature_tuning scales their queries by
                    1 + attn_scale·log(1 + floor((pos + 1) / floor_scale)).
    query_scale_beta  queries of every layer scaled by 1 + beta·log(1 + floor(pos / query_scale_length)) (Mistral
                    Small 4's llama_4_scaling_beta over the original context); 0: none.
    softmax_scale   the attention logits' scale (GQA); None: 1/sqrt(head_dim) (Granite's attention_multiplier).
    output_gate     gated attention (Qwen3-Next): q_proj also yields a per-head gate whose sigmoid scales the output.
    linear_*        the "linear" layers' Gated DeltaNet (Qwen3-Next, Qwen3.5): key and value heads and widths, and
                    the short causal convolution's kernel over the projected q, k, v; linear_projection: grouped
                    (Qwen3-Next: in_proj_qkvz / in_proj_ba, grouped per key head) or split (Qwen3.5: in_proj_qkv,
                    in_proj_z, in_proj_b, in_proj_a).
    mamba_*         the "mamba" layers' Mamba-1 (Jamba) and "mamba2" layers' Mamba-2 (Granite 4.0-H): state size,
                    convolution kernel, inner width as a multiple of the hidden size, the time step's rank (Mamba-1),
                    heads, B/C groups and prompt chunk (Mamba-2), biases of the convolution and of the projections.
    rope_interleave rotary pairs are adjacent (x0, x1) rather than split halves (DeepSeek, Llama 4).
    partial_rotary  the fraction of each head's dimensions that rotate, the first ones (GLM-4.5: 0.5).
    q_lora_rank ... v_head_dim  the MLA shapes (q_lora_rank None: a plain q projection).
    index_topk      DeepSeek Sparse Attention (MLA with q-LoRA): each query attends to the index_topk keys its
                    lightning indexer scores best (index_heads heads of index_head_dim; rope on its first
                    qk_rope_head_dim dimensions, interleaved where index_rope_interleave); 0: dense attention.
                    index_shared_layers reuse the previous indexer layer's pick (GLM-5)."""

    kind: Literal["gqa", "mla", "compressed"] = "gqa"
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: Literal["none", "head", "head_after_rope", "full", "l2"] = "none"
    clip_qkv: float | None = None
    sinks: bool = False
    sink_layers: Literal["all", "sliding"] = "all"
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    sliding_kv_heads: int | None = None
    sliding_rope_theta: float | None = None
    value_scale: float = 1.0
    chunk_size: int | None = None
    nope_layers: tuple[int, ...] = ()
    temperature_tuning: bool = False
    attn_scale: float = 0.1
    floor_scale: float = 8192.0
    query_scale_beta: float = 0.0
    query_scale_length: int = 1
    softmax_scale: float | None = None
    output_gate: bool = False
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    linear_conv: int = 4
    linear_projection: Literal["grouped", "split"] = "grouped"
    mamba_state: int = 16
    mamba_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int = 0
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_heads: int = 0
    mamba_groups: int = 1
    mamba_chunk: int = 256
    rope_interleave: bool = False
    partial_rotary: float = 1.0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    index_topk: int = 0
    index_heads: int = 0
    index_head_dim: int = 0
    index_rope_interleave: bool = False
    index_shared_layers: tuple[int, ...] = ()
    compress_rate: int = 4
    heavy_compress_rate: int = 128
    o_groups: int = 0
    o_lora_rank: int = 0

    def __post_init__(self) -> None:
        check_choice("attention.kind", self.kind, ATTENTION_KINDS)
        check_choice("attention.qk_norm", self.qk_norm, QK_NORMS)
        if self.clip_qkv is not None:
            check_float("attention.clip_qkv", self.clip_qkv, 0.0, lo_open=True)
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            for t in self.layer_types:
                check_choice("attention.layer_types[]", t, LAYER_TYPES)
            if "sliding" in self.layer_types:
                check_int("attention.sliding_window", self.sliding_window, 1)
            if "chunked" in self.layer_types:
                check_int("attention.chunk_size", self.chunk_size, 1)
            if "mamba" in self.layer_types:
                for name in ("mamba_state", "mamba_conv", "mamba_expand", "mamba_dt_rank"):
                    check_int(f"attention.{name}", getattr(self, name), 1)
            if "mamba2" in self.layer_types:
                for name in ("mamba_state", "mamba_conv", "mamba_expand", "mamba_heads", "mamba_groups"):
                    check_int(f"attention.{name}", getattr(self, name), 1)
                if self.mamba_heads % self.mamba_groups:
                    fail("attention.mamba_heads", self.mamba_heads, "a multiple of mamba_groups")
            if "linear" in self.layer_types:
                for name in ("linear_key_heads", "linear_value_heads", "linear_key_dim", "linear_value_dim"):
                    check_int(f"attention.{name}", getattr(self, name), 1)
                check_int("attention.linear_conv", self.linear_conv, 1)
                check_choice("attention.linear_projection", self.linear_projection, ("grouped", "split"))
                if self.linear_value_heads % self.linear_key_heads:
                    fail("attention.linear_value_heads", self.linear_value_heads, "a multiple of linear_key_heads")
        object.__setattr__(self, "nope_layers", tuple(sorted(set(self.nope_layers))))
        check_float("attention.partial_rotary", self.partial_rotary, 0.0, 1.0, lo_open=True)
        check_float("attention.query_scale_beta", self.query_scale_beta, 0.0)
        check_choice("attention.sink_layers", self.sink_layers, ("all", "sliding"))
        check_float("attention.value_scale", self.value_scale, 0.0, lo_open=True)
        if self.sliding_kv_heads is not None:
            check_int("attention.sliding_kv_heads", self.sliding_kv_heads, 1)
        if self.sliding_rope_theta is not None:
            check_float("attention.sliding_rope_theta", self.sliding_rope_theta, 0.0, lo_open=True)
        check_int("attention.query_scale_length", self.query_scale_length, 1)
        if self.softmax_scale is not None:
            check_float("attention.softmax_scale", self.softmax_scale, 0.0, lo_open=True)
            if self.kind != "gqa":
                fail("attention.softmax_scale", self.softmax_scale, "None for MLA and compressed attention")
        if self.kind == "mla":
            check_int("attention.kv_lora_rank", self.kv_lora_rank, 1)
            check_int("attention.qk_nope_head_dim", self.qk_nope_head_dim, 0)
            check_int("attention.qk_rope_head_dim", self.qk_rope_head_dim, 2)
            check_int("attention.v_head_dim", self.v_head_dim, 1)
            if self.q_lora_rank is not None:
                check_int("attention.q_lora_rank", self.q_lora_rank, 1)
            if self.qk_rope_head_dim % 2:
                fail("attention.qk_rope_head_dim", self.qk_rope_head_dim, "an even number (rotary pairs)")
            if self.sinks or self.qk_norm != "none":
                fail("attention.kind", "mla", "gqa when sinks or qk_norm are set")
        object.__setattr__(self, "index_shared_layers", tuple(sorted(set(self.index_shared_layers))))
        if self.kind == "compressed":
            check_int("attention.q_lora_rank", self.q_lora_rank, 1)
            check_int("attention.sliding_window", self.sliding_window, 1)
            check_int("attention.o_groups", self.o_groups, 1)
            check_int("attention.o_lora_rank", self.o_lora_rank, 1)
            check_int("attention.compress_rate", self.compress_rate, 1)
            check_int("attention.heavy_compress_rate", self.heavy_compress_rate, 1)
            if "compressed" in (self.layer_types or ()):
                check_int("attention.index_topk", self.index_topk, 1)
                check_int("attention.index_heads", self.index_heads, 1)
                check_int("attention.index_head_dim", self.index_head_dim, 2)
        elif self.index_topk:
            check_int("attention.index_topk", self.index_topk, 1)
            if self.kind != "mla" or self.q_lora_rank is None:
                fail("attention.index_topk", self.index_topk, "0 unless kind is mla with a q_lora_rank, or compressed")
            check_int("attention.index_heads", self.index_heads, 1)
            check_int("attention.index_head_dim", self.index_head_dim, self.qk_rope_head_dim)
            if self.index_shared_layers and self.index_shared_layers[0] == 0:
                fail("attention.index_shared_layers", self.index_shared_layers, "layers after the first")

    def layer_type(self, i: int) -> str:
        """full, sliding or chunked; layers past the listed ones (multi-token-prediction modules) are full."""
        return self.layer_types[i] if self.layer_types and i < len(self.layer_types) else "full"

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """The layers with linear attention or a state-space model (a recurrent state per sequence instead of a KV
        cache)."""
        return tuple(i for i, t in enumerate(self.layer_types or ()) if t in RECURRENT)

    def has_sinks(self, i: int) -> bool:
        return self.sinks and (self.sink_layers == "all" or self.layer_type(i) == "sliding")

    def check_layers(self, num_layers: int) -> None:
        if self.layer_types is not None and len(self.layer_types) != num_layers:
            fail("attention.layer_types", f"{len(self.layer_types)} entries", f"one per layer ({num_layers})")
        for i in self.nope_layers:
            check_int("attention.nope_layers[]", i, 0, num_layers - 1)

    def describe(self) -> str:
        if self.kind == "mla":
            q = f"q rank {self.q_lora_rank}" if self.q_lora_rank else "full-rank q"
            text = f"MLA (latent {self.kv_lora_rank} + rope key {self.qk_rope_head_dim}, {q})"
            if self.index_topk:
                shared = f", {len(self.index_shared_layers)} layers share it" if self.index_shared_layers else ""
                text += (
                    f", sparse: top {self.index_topk} keys by a {self.index_heads}-head indexer"
                    f" ({self.index_head_dim}-wide keys{shared})"
                )
        elif self.kind == "compressed":
            kinds = self.layer_types or ()
            text = (
                f"one K=V head over a {self.sliding_window}-token window with sinks; {kinds.count('compressed')} "
                f"layers add 1 entry per {self.compress_rate} tokens (top {self.index_topk} by a {self.index_heads}"
                f"-head indexer), {kinds.count('heavily_compressed')} 1 per {self.heavy_compress_rate}; q rank "
                f"{self.q_lora_rank}, output in {self.o_groups} groups of {self.o_lora_rank}"
            )
        else:
            text = "GQA"
        extras = [f"qk-norm {self.qk_norm}"] if self.qk_norm != "none" else []
        if self.partial_rotary < 1:
            extras.append(f"rope on {self.partial_rotary:g} of each head")
        if self.sinks and self.kind != "compressed":
            extras.append("sinks" if self.sink_layers == "all" else "sinks on sliding layers")
        if self.sliding_kv_heads is not None:
            extras.append(f"{self.sliding_kv_heads} KV heads on sliding layers")
        if self.value_scale != 1.0:
            extras.append(f"values x{self.value_scale:g}")
        if self.layer_types and "sliding" in self.layer_types and self.kind != "compressed":
            extras.append(f"{self.layer_types.count('sliding')} sliding-window layers ({self.sliding_window})")
        if self.layer_types and "chunked" in self.layer_types:
            extras.append(f"{self.layer_types.count('chunked')} chunked layers ({self.chunk_size})")
        if self.nope_layers:
            extras.append(f"{len(self.nope_layers)} NoPE layers")
        if self.softmax_scale is not None:
            extras.append(f"logits scaled by {self.softmax_scale:g}")
        if self.output_gate:
            extras.append("gated output")
        kinds = {"linear": "Gated DeltaNet", "mamba": "Mamba", "mamba2": "Mamba-2"}
        for kind, name in kinds.items():
            if kind in (self.layer_types or ()):
                extras.append(f"{self.layer_types.count(kind)} {name} layers")
        if self.query_scale_beta:
            extras.append(f"queries scaled by position (beta {self.query_scale_beta:g} per {self.query_scale_length})")
        return text + (f", {', '.join(extras)}" if extras else "")
