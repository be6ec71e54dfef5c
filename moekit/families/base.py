"""What a published model family means to moekit, as one object: how its config.json reads into a ModelConfig,
how a ModelConfig writes back (families transformers loads moekit's models as), how its checkpoints name tensors,
and which of moekit's fused decode steps cover its layers. Each family is data on the core model (a RoutingSpec,
an ExpertLayout, attention variants), never a copy of a modeling file."""

from __future__ import annotations

from moekit.checkpoint.names import GgufArch, TensorNames
from moekit.config.attention import AttentionConfig, RopeScaling
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig

HF_LAYER_TYPES = {
    "full_attention": "full",
    "sliding_attention": "sliding",
    "chunked_attention": "chunked",
    "linear_attention": "linear",
}
# What of a family's MoE layers moekit's fused inference steps (moekit.infer.fast) cover: the attention block of a
# decode step, and the MoE block (at a decode step and over a batch of tokens).
FUSED_STEPS = ("attention", "moe")


def need(c: dict, *keys: str):
    """The first of keys that c holds (not None), or a ValueError naming them."""
    for k in keys:
        if c.get(k) is not None:
            return c[k]
    raise ValueError(f"config.json lacks {' / '.join(keys)}, which the {c.get('model_type')} family needs")


def experts_top_k(c: dict) -> tuple[int, int]:
    """(routed experts, experts per token) under any of the names the families use."""
    return need(c, "num_local_experts", "num_experts", "n_routed_experts"), need(
        c, "num_experts_per_tok", "experts_per_token"
    )


def listed_moe_layers(c: dict) -> tuple[int, ...] | None:
    """The MoE layers a config lists: mlp_layer_types ("sparse") or a moe_layer_freq list (1s); None if neither."""
    if c.get("mlp_layer_types"):
        return tuple(i for i, k in enumerate(c["mlp_layer_types"]) if k == "sparse")
    if isinstance(c.get("moe_layer_freq"), list):
        return tuple(i for i, f in enumerate(c["moe_layer_freq"]) if f)
    return None


def aux_loss_coef(c: dict) -> float:
    return float(c.get("router_aux_loss_coef") or 0.0)


def layer_types(c: dict, n_layers: int, default: str | None = None) -> tuple[str, ...] | None:
    """The attention type of each layer (moekit's names) from layer_types, else `default` for all, else None."""
    types = c.get("layer_types")
    if types:
        return tuple(HF_LAYER_TYPES.get(t, t) for t in types)
    return (default,) * n_layers if default else None


def rope_parameters(cfg: ModelConfig) -> dict:
    """transformers' rope_parameters: theta plus the scaling fields under their Hugging Face names."""
    out: dict = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    rs: RopeScaling | None = cfg.rope_scaling
    if rs is None:
        return out
    out.update(rope_type=rs.type, factor=rs.factor)
    if rs.original_max_position is not None:
        out["original_max_position_embeddings"] = rs.original_max_position
    if rs.type == "yarn":
        out.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, truncate=rs.truncate)
        out.update(mscale=rs.mscale, mscale_all_dim=rs.mscale_all_dim)
    elif rs.type == "llama3":
        out.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
    elif rs.type == "longrope":
        out.update(short_factor=list(rs.short_factor), long_factor=list(rs.long_factor))
        out.update(short_mscale=rs.short_mscale, long_mscale=rs.long_mscale)
    return out


def partial_rotary(c: dict, default: float = 1.0) -> float:
    """The rotating fraction of each head, under any of the names the families use (rotary_dim in heads' units)."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    found = c.get("partial_rotary_factor") or rope.get("partial_rotary_factor")
    if found is None and c.get("rotary_dim"):
        found = c["rotary_dim"] / need(c, "head_dim")
    return float(found or default)


class Family:
    """One published family. Subclasses set the class attributes and implement moe() and attention(); families
    that transformers can load moekit's models as also implement write() (and set write_rank)."""

    model_type: str = ""
    aliases: tuple[str, ...] = ()  # other model_type values read as this family (Llama 4's wrapper: llama4)
    architecture: str | None = None  # transformers' class named in a written config.json
    write_rank: int | None = None  # order in which saving tries the writing families (lowest first); None: never
    gguf_arch: GgufArch | None = None  # what llama.cpp's architecture for it computes (export-gguf); None: none
    names: TensorNames = TensorNames()
    # The fused steps (FUSED_STEPS) that cover this family's MoE layers, with the particulars its tests switch on
    # (tests/hf_tiny.py); tests check it against what moekit.infer.fast installs.
    fused_steps: frozenset[str] = frozenset(FUSED_STEPS)
    norm: str = "rms"
    norm_eps: float = 1e-6  # when config.json gives none
    mla: bool = False  # MLA sets its own head widths: head_dim is not read
    reads_mtp: bool = False  # num_nextn_predict_layers are multi-token-prediction layers

    def fields(self, hf: dict) -> dict:
        """The language model's fields under the common names (multimodal configs keep them in text_config)."""
        return hf["text_config"] if isinstance(hf.get("text_config"), dict) else hf

    def language_model(self, hf: dict) -> dict:
        """The config.json of the language model alone, as the family that computes it reads it (a multimodal
        wrapper's text model; default: hf itself)."""
        return hf

    def tensor_name(self, hf: dict, stored: str) -> str | None:
        """The language model's checkpoint name of a tensor as the files of config hf store it (default: the same);
        None for a tensor of another part (a vision tower), which moekit does not load."""
        return stored

    def moe(self, c: dict) -> tuple[MoEConfig, tuple[int, ...], int | None]:
        """(MoEConfig, MoE layer indices, dense FFN width) of the language model's fields c."""
        raise NotImplementedError

    def attention(self, c: dict) -> AttentionConfig:
        return AttentionConfig()

    def read(self, hf: dict, name: str = "") -> ModelConfig:
        """The ModelConfig of a config.json of this family."""
        c = self.fields(hf)
        moe, layers, dense = self.moe(c)
        n_layers = c["num_hidden_layers"]
        return ModelConfig(
            hidden_size=c["hidden_size"],
            num_layers=n_layers,
            num_heads=c["num_attention_heads"],
            num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=None if self.mla else c.get("head_dim"),
            moe=moe,
            moe_layers=layers,
            dense_hidden=dense if len(layers) < n_layers else None,
            vocab_size=c["vocab_size"],
            attention=self.attention(c),
            rope_theta=float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
            rope_scaling=RopeScaling.from_hf(
                c.get("rope_scaling") or c.get("rope_parameters"), c.get("max_position_embeddings")
            ),
            norm_eps=float(c.get("rms_norm_eps", self.norm_eps)),
            norm=self.norm,
            lm_head_bias=bool(c.get("lm_head_bias", False)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_position=int(c.get("max_position_embeddings") or 4096),
            mtp_layers=int(c.get("num_nextn_predict_layers") or 0) if self.reads_mtp else 0,
            family=self.model_type,
            name=name,
        )

    def write(self, cfg: ModelConfig) -> dict:
        """The config.json of this family computing cfg (checked by reading it back; see moekit.families.export)."""
        raise NotImplementedError(f"moekit does not write {self.model_type} configs")

    def common_fields(self, cfg: ModelConfig) -> dict:
        """The fields every written family spells out (transformers would otherwise default them)."""
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position,
            "initializer_range": cfg.init_std,
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "rope_parameters": rope_parameters(cfg),
            "attention_dropout": 0.0,
            "use_cache": True,
        }
