"""DBRX (`dbrx`): its own field names (attention and FFN settings nested in attn_config / ffn_config), LayerNorm
without biases, clip_qkv, softmax top-k renormalised by a p-norm, the router in the model's dtype; the q, k, v
projections fused into one Wqkv tensor and the experts into [E * F, D] matrices."""

from __future__ import annotations

from moekit.checkpoint.names import STACKED, Fused, TensorNames
from moekit.config.attention import AttentionConfig
from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.families.base import Family, aux_loss_coef, experts_top_k, need
from moekit.routing.spec import RoutingSpec

BLOCK = "transformer.blocks.{i}"
QKV = tuple((f"layers.{{i}}.self_attn.{p}_proj.weight", "rows") for p in "qkv")
NAMES = TensorNames(
    renames=(
        ("^transformer.wte.", "^embed_tokens."),
        ("^transformer.norm_f.", "^norm."),
        ("^transformer.blocks.", "^layers."),
        (".norm_attn_norm.norm_1.", ".input_layernorm."),
        (".norm_attn_norm.norm_2.", ".post_attention_layernorm."),
        (".norm_attn_norm.attn.out_proj.", ".self_attn.o_proj."),
        (".ffn.router.layer.", ".mlp.router."),
    ),
    prefix="",
    fused=(
        Fused(
            f"{BLOCK}.norm_attn_norm.attn.Wqkv.weight",
            tuple((f"layers.{{i}}.self_attn.{p}_proj.weight", "rows") for p in "qkv"),
        ),
        Fused(f"{BLOCK}.ffn.experts.mlp.w1", (("layers.{i}.mlp.experts.gate_up_proj", "gate"),)),
        Fused(f"{BLOCK}.ffn.experts.mlp.v1", (("layers.{i}.mlp.experts.gate_up_proj", "up"),)),
        Fused(f"{BLOCK}.ffn.experts.mlp.w2", (("layers.{i}.mlp.experts.down_proj", "transposed"),)),
    ),
    experts=STACKED,
)
ACTIVATIONS = ("silu", "gelu", "relu")


class Dbrx(Family):
    model_type = "dbrx"
    names = NAMES
    norm = "layer_nobias"
    norm_eps = 1e-5
    fused_steps = frozenset({"moe"})  # LayerNorm: no attention step (it reads an RMSNorm)

    def fields(self, hf: dict) -> dict:
        """DBRX's fields under the common names."""
        c = super().fields(hf)
        attn, ffn = c.get("attn_config") or {}, c.get("ffn_config") or {}
        renamed = {
            "hidden_size": c.get("d_model"),
            "num_hidden_layers": c.get("n_layers"),
            "num_attention_heads": c.get("n_heads"),
            "num_key_value_heads": attn.get("kv_n_heads"),
            "max_position_embeddings": c.get("max_seq_len"),
            "rope_theta": attn.get("rope_theta"),
            "clip_qkv": attn.get("clip_qkv"),
            "num_local_experts": ffn.get("moe_num_experts"),
            "num_experts_per_tok": ffn.get("moe_top_k"),
            "intermediate_size": ffn.get("ffn_hidden_size"),
            "hidden_act": (ffn.get("ffn_act_fn") or {}).get("name", "silu"),
            "moe_normalize_expert_weights": ffn.get("moe_normalize_expert_weights"),
            "router_jitter_noise": ffn.get("moe_jitter_eps"),
            "router_aux_loss_coef": ffn.get("moe_loss_weight"),
        }
        return {**c, **{k: v for k, v in renamed.items() if v is not None}}

    def moe(self, c):
        p = c.get("moe_normalize_expert_weights")
        spec = RoutingSpec(
            *experts_top_k(c), normalize=p is not None, normalize_p=float(p or 1.0), router_dtype="model"
        )
        activation = c.get("hidden_act", "silu")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ffn_act_fn={activation!r} is unsupported: allowed {', '.join(ACTIVATIONS)}")
        moe = MoEConfig(
            routing=spec,
            expert_hidden=need(c, "intermediate_size"),
            layout=ExpertLayout(activation=activation),
            aux_loss_coef=aux_loss_coef(c),
            jitter=float(c.get("router_jitter_noise") or 0.0),
        )
        return moe, tuple(range(c["num_hidden_layers"])), c.get("intermediate_size")

    def attention(self, c):
        return AttentionConfig(clip_qkv=c.get("clip_qkv"))


FAMILY = Dbrx()
