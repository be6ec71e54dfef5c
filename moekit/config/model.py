"""The configuration of a whole decoder-only MoE transformer."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from moekit._validate import check_choice, check_float, check_int, fail
from moekit.config.attention import AttentionConfig, RopeScaling
from moekit.config.moe import MoEConfig

# RMSNorm; RMSNorm with its weight stored as 1 + w (Qwen3-Next); LayerNorm with or without a bias (Phi-3.5-MoE, DBRX)
NORMS = ("rms", "rms_offset", "layer", "layer_nobias")


def place_moe_layers(
    num_layers: int, first_dense: int = 0, step: int = 1, dense_layers: tuple[int, ...] = ()
) -> tuple[int, ...]:
    """Which layers hold an MoE block: after the first `first_dense` dense ones (DeepSeek's first_k_dense_replace),
    every `step`-th layer ((i + 1) % step == 0, Qwen's decoder_sparse_step, Llama 4's interleave step), except
    `dense_layers` (Qwen's mlp_only_layers)."""
    return tuple(i for i in range(num_layers) if i >= first_dense and (i + 1) % step == 0 and i not in dense_layers)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: RMSNorm, RoPE, attention as configured (grouped-query or MLA), and per layer
    either a dense gated FFN (width dense_hidden) or an MoE block (moe) at the indices in moe_layers (None: every
    layer). mtp_layers: DeepSeek-V3's multi-token-prediction modules (each one extra decoder layer predicting one
    token further ahead); they are not used by the plain forward pass. norm: the layer norms (see NORMS);
    lm_head_bias: a bias on the output head (Phi-3.5-MoE). hyper_streams > 1: the residual is that many streams mixed
    by hyper-connections (DeepSeek-V4; Sinkhorn iterations and eps); table_layers: MoE layers whose experts a
    token-id table picks (DeepSeek-V4's first layers: moe.router becomes token_table there). layer_top_k: each
    layer's top-k where the layers differ (Hunyuan's moe_topk list; None: moe's for all). embedding_multiplier,
    residual_multiplier, logits_scaling: muP's constants (Granite): the embeddings are multiplied by the first,
    each block's output by the second before its residual add, the logits divided by the third."""

    hidden_size: int
    num_layers: int
    num_heads: int
    moe: MoEConfig | None
    vocab_size: int = 256
    num_kv_heads: int | None = None
    head_dim: int | None = None
    dense_hidden: int | None = None
    moe_layers: tuple[int, ...] | None = None
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    norm: str = "rms"
    lm_head_bias: bool = False
    mtp_layers: int = 0
    tie_embeddings: bool = False
    max_position: int = 4096
    init_std: float = 0.02
    hyper_streams: int = 1
    hyper_sinkhorn_iters: int = 20
    hyper_eps: float = 1e-6
    table_layers: tuple[int, ...] = ()
    layer_top_k: tuple[int, ...] | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    family: str = "moekit"
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_int("hidden_size", self.hidden_size, 1)
        check_int("num_layers", self.num_layers, 1)
        check_int("num_heads", self.num_heads, 1)
        check_int("vocab_size", self.vocab_size, 1)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        check_int("num_kv_heads", self.num_kv_heads, 1, self.num_heads)
        if self.num_heads % self.num_kv_heads:
            fail("num_kv_heads", self.num_kv_heads, f"a divisor of num_heads={self.num_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                fail("num_heads", self.num_heads, f"a divisor of hidden_size={self.hidden_size} (or set head_dim)")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        check_int("head_dim", self.head_dim, 2)
        if self.head_dim % 2:
            fail("head_dim", self.head_dim, "an even number (rotary embedding pairs)")
        if self.moe_layers is None:
            object.__setattr__(self, "moe_layers", tuple(range(self.num_layers)) if self.moe else ())
        object.__setattr__(self, "moe_layers", tuple(sorted(set(self.moe_layers))))
        for i in self.moe_layers:
            check_int("moe_layers[]", i, 0, self.num_layers - 1)
        if self.moe_layers and self.moe is None:
            fail("moe", None, "an MoEConfig when moe_layers is not empty")
        if self.dense_hidden is None:
            if len(self.moe_layers) < self.num_layers:
                fail("dense_hidden", None, "an integer >= 1 when some layers are dense")
        else:
            check_int("dense_hidden", self.dense_hidden, 1)
        check_float("rope_theta", self.rope_theta, 0.0, lo_open=True)
        check_float("norm_eps", self.norm_eps, 0.0, lo_open=True)
        check_int("max_position", self.max_position, 1)
        check_int("mtp_layers", self.mtp_layers, 0)
        check_choice("norm", self.norm, NORMS)
        if not isinstance(self.attention, AttentionConfig):
            fail("attention", self.attention, "an AttentionConfig")
        self.attention.check_layers(self.num_layers)
        check_int("hyper_streams", self.hyper_streams, 1)
        if self.layer_top_k is not None:
            object.__setattr__(self, "layer_top_k", tuple(self.layer_top_k))
            if len(self.layer_top_k) != self.num_layers:
                fail("layer_top_k", self.layer_top_k, f"one top-k per layer ({self.num_layers})")
            for k in self.layer_top_k:
                check_int("layer_top_k[]", k, 1, self.moe.num_experts if self.moe else 1)
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            check_float(name, getattr(self, name), 0.0, lo_open=True)
        if self.residual_multiplier != 1.0 and self.hyper_streams > 1:
            fail("residual_multiplier", self.residual_multiplier, "1.0 with hyper-connections")
        check_int("hyper_sinkhorn_iters", self.hyper_sinkhorn_iters, 1)
        object.__setattr__(self, "table_layers", tuple(sorted(set(self.table_layers))))
        for i in self.table_layers:
            if i not in self.moe_layers:
                fail("table_layers[]", i, "MoE layers only")
        sliding_kv = self.attention.sliding_kv_heads
        if sliding_kv is not None and self.num_heads % sliding_kv:
            fail("attention.sliding_kv_heads", sliding_kv, f"a divisor of num_heads={self.num_heads}")

    @property
    def mup(self) -> bool:
        """Whether muP's multipliers change anything (the fused decode steps do not apply them)."""
        return (self.embedding_multiplier, self.residual_multiplier, self.logits_scaling) != (1.0, 1.0, 1.0)

    @property
    def rope_dim(self) -> int:
        """The rotary width of a head: all of it or its partial_rotary fraction (GQA), MLA's decoupled rope part."""
        if self.attention.kind == "mla":
            return self.attention.qk_rope_head_dim
        return int(self.head_dim * self.attention.partial_rotary) // 2 * 2

    def kv_heads(self, i: int) -> int:
        """The key/value heads of layer i (GQA; sliding layers may have their own count)."""
        sliding = self.attention.sliding_kv_heads
        return sliding if sliding is not None and self.attention.layer_type(i) == "sliding" else self.num_kv_heads

    @property
    def value_dim(self) -> int:
        """The width of a value head (GQA): the head's, or attention.v_head_dim where it differs."""
        return self.attention.v_head_dim or self.head_dim

    def layer_moe(self, i: int) -> MoEConfig | None:
        """The MoE config of layer i (a token-table router on table_layers, the layer's own top-k), None for a dense
        layer."""
        if not self.is_moe_layer(i):
            return None
        if self.layer_top_k is not None and self.layer_top_k[i] != self.moe.top_k:
            return replace(self.moe, routing=replace(self.moe.routing, top_k=self.layer_top_k[i]))
        if i in self.table_layers:  # the table picks: no selection bias to balance
            routing = replace(self.moe.routing, selection_bias=False)
            table = dict(router="token_table", table_vocab=self.vocab_size, bias_update_rate=0.0)
            return replace(self.moe, routing=routing, **table)
        return self.moe

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers
