"""DeepSeek-V4 (`deepseek_v4`): hyper-connected residual streams (hc_mult, Sinkhorn-normalised mixing); attention
with one K = V head over a sliding window and sinks, plus compressed entries (CSA: 1 per 4 tokens, picked by a
lightning indexer; HCA: 1 per 128 tokens), q-LoRA and a grouped output projection; rope on the last dims of each
head, a plain theta on sliding layers and a scaled one on compressed layers; MoE on every layer with sqrt-softplus
scores, a selection bias, always renormalised and scaled, a shared expert, SwiGLU of clamped gate and up; the first
layers' experts picked by a token-id table. Reads transformers' fields and the release's (compress_ratios,
compress_rope_theta with rope_scaling, num_hash_layers); the release's multi-token-prediction layers are not read."""

from __future__ import annotations

from dataclasses import replace

from moekit.checkpoint.names import ExpertKeys, TensorNames
from moekit.config.attention import AttentionConfig, RopeScaling
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.families.base import Family, experts_top_k, need
from moekit.routing.spec import RoutingSpec

TYPES = {
    "sliding_attention": "sliding",
    "compressed_sparse_attention": "compressed",
    "heavily_compressed_attention": "heavily_compressed",
}
RATIO_TYPES = {0: "sliding", 4: "compressed", 128: "heavily_compressed"}

# The names transformers writes (and the release's, below `model.`), to moekit's modules.
RENAMES = (
    (".attn_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".hc_attn_", ".attn_hc."),
    (".hc_ffn_", ".ffn_hc."),
    (".compressor.wkv.", ".compressor.kv_proj."),
    (".compressor.wgate.", ".compressor.gate_proj."),
    (".compressor.ape", ".compressor.position_bias"),
    (".compressor.norm.", ".compressor.kv_norm."),
    (".attn.indexer.", ".self_attn.indexer."),
    (".self_attn.indexer.wq_b.", ".self_attn.indexer.q_b_proj."),
    (".attn.compressor.", ".self_attn.compressor."),
    (".attn.wq_a.", ".self_attn.q_a_proj."),
    (".attn.q_norm.", ".self_attn.q_a_norm."),
    (".attn.wq_b.", ".self_attn.q_b_proj."),
    (".attn.wkv.", ".self_attn.kv_proj."),
    (".attn.norm.", ".self_attn.kv_norm."),
    (".attn.wo_a.", ".self_attn.o_a_proj."),
    (".attn.wo_b.", ".self_attn.o_b_proj."),
    (".attn.attn_sink", ".self_attn.sinks"),
    (".mlp.gate.weight", ".mlp.router.weight"),
    (".mlp.gate.bias", ".mlp.router.selection_bias_E"),
    (".mlp.gate.tid2eid", ".mlp.router.table_VK"),
    (".ffn.shared_experts.w1.", ".mlp.shared_experts.gate_proj."),
    (".ffn.shared_experts.w3.", ".mlp.shared_experts.up_proj."),
    (".ffn.shared_experts.w2.", ".mlp.shared_experts.down_proj."),
)
# The release's files name the model's own tensors without a prefix.
RELEASE = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def _layer_types(c: dict) -> tuple[str, ...]:
    n = c["num_hidden_layers"]
    if c.get("layer_types"):
        return tuple(TYPES.get(t, t) for t in c["layer_types"][:n])
    if c.get("compress_ratios"):
        return tuple(RATIO_TYPES[r] for r in c["compress_ratios"][:n])
    alternate = ["compressed" if i % 2 else "heavily_compressed" for i in range(max(n - 2, 0))]
    return tuple((["heavily_compressed"] * min(n, 2) + alternate)[:n])


def _ropes(c: dict) -> tuple[dict, dict]:
    """(main, compress) rope parameters: transformers' per-type dict, else the release's fields."""
    rp = c.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        return rp["main"], rp["compress"]
    scaled = {k: v for k, v in (c.get("rope_scaling") or rp).items() if k not in ("main", "compress")}
    main = {"rope_theta": c.get("rope_theta") or 10000.0}
    return main, {**scaled, "rope_theta": c.get("compress_rope_theta") or 160000.0}


class DeepseekV4(Family):
    model_type = "deepseek_v4"
    architecture = "DeepseekV4ForCausalLM"
    names = TensorNames(
        renames=RENAMES,
        experts=ExpertKeys(per_expert=True, container="ffn", gate="w1", up="w3", down="w2"),
        head="head.",
    )
    # The attention (compressed entries, one K = V head) and the hyper-connected blocks are the modules' at decode;
    # the MoE blocks of the learned-router layers take the fused step over a batch of tokens.
    fused_steps = frozenset({"attention", "moe"})

    def tensor_name(self, hf: dict, stored: str) -> str | None:
        if stored.startswith("mtp."):  # the release's multi-token-prediction layer
            return None
        if stored in RELEASE:
            return RELEASE[stored]
        if stored.startswith("hc_head_"):
            return "model.hc_head.hc_" + stored.removeprefix("hc_head_")
        if stored.endswith(".scale"):  # the release's quantized weights: X.weight and X.scale
            stored = stored.removesuffix("scale") + "weight_scale_inv"
        return "model." + stored if stored.startswith("layers.") else stored

    def moe(self, c):
        shared = c.get("n_shared_experts") or 0
        f = need(c, "moe_intermediate_size")
        spec = RoutingSpec(
            *experts_top_k(c),
            score_func=c.get("scoring_func") or "sqrtsoftplus",
            selection_bias=True,
            normalize=True,
            normalize_eps=1e-20,
            scaling_factor=float(c.get("routed_scaling_factor") or 1.0),
            router_dtype="model",
        )
        moe = MoEConfig(
            routing=spec,
            expert_hidden=f,
            layout=ExpertLayout(activation="limited_swiglu", swiglu_limit=float(c.get("swiglu_limit") or 10.0)),
            **(dict(num_shared_experts=shared, shared_hidden=shared * f) if shared else {}),
        )
        return moe, tuple(range(c["num_hidden_layers"])), None

    def attention(self, c):
        rates = c.get("compress_rates") or {}
        head_dim = need(c, "head_dim")
        rope_dim = c.get("qk_rope_head_dim") or int(head_dim * (c.get("partial_rotary_factor") or 64 / 512))
        main, _ = _ropes(c)
        return AttentionConfig(
            kind="compressed",
            sinks=True,
            layer_types=_layer_types(c),
            sliding_window=need(c, "sliding_window"),
            q_lora_rank=need(c, "q_lora_rank"),
            o_groups=need(c, "o_groups"),
            o_lora_rank=need(c, "o_lora_rank"),
            index_topk=need(c, "index_topk"),
            index_heads=need(c, "index_n_heads"),
            index_head_dim=need(c, "index_head_dim"),
            compress_rate=rates.get("compressed_sparse_attention") or c.get("compress_rate_csa") or 4,
            heavy_compress_rate=rates.get("heavily_compressed_attention") or c.get("compress_rate_hca") or 128,
            partial_rotary=rope_dim / head_dim,
            sliding_rope_theta=float(main["rope_theta"]),
        )

    def read(self, hf: dict, name: str = "") -> ModelConfig:
        c = self.fields(hf)
        n = c["num_hidden_layers"]
        _, compress = _ropes(c)
        kinds = c.get("mlp_layer_types")
        tables = [i for i, k in enumerate(kinds) if k == "hash_moe"] if kinds else range(c.get("num_hash_layers", 3))
        flat = {**c, "rope_theta": compress["rope_theta"], "rope_parameters": None, "rope_scaling": None}
        return replace(
            super().read(flat, name),
            attention=self.attention(c),  # the sliding layers' theta is the main one
            rope_scaling=RopeScaling.from_hf(compress, c.get("max_position_embeddings")),
            hyper_streams=int(c.get("hc_mult") or 1),
            hyper_sinkhorn_iters=int(c.get("hc_sinkhorn_iters") or 20),
            hyper_eps=float(c.get("hc_eps") or 1e-6),
            table_layers=tuple(i for i in tables if i < n),
        )


FAMILY = DeepseekV4()
