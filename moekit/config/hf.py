"""From a Hugging Face config.json of a published MoE family to moekit configs: the routing and expert part.

Each family is data (a RoutingSpec, an expert layout, a layer placement), never a copy of a modeling file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from moekit.config.model import place_moe_layers
from moekit.config.moe import MoEConfig
from moekit.experts.layout import ExpertLayout
from moekit.routing.spec import RoutingSpec

FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "phimoe",
    "dbrx",
    "gpt_oss",
    "llama4_text",
)


def published_names() -> list[str]:
    """The published configs that ship with moekit (usable by name)."""
    return sorted(
        p.name[:-5]
        for p in resources.files("moekit.config").joinpath("published").iterdir()
        if p.name.endswith(".json")
    )


def load_hf_config(name_or_path: str | Path) -> dict:
    """A config.json by path (file or model directory) or by the name of a shipped published config."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        if str(name_or_path) in published_names():
            text = resources.files("moekit.config").joinpath("published", f"{name_or_path}.json").read_text()
            return json.loads(text)
        raise ValueError(
            f"model {str(name_or_path)!r} is unknown: allowed a config.json path, a model directory, "
            f"or one of {', '.join(published_names())}"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def text_config(hf: dict) -> dict:
    """The language model's fields under the common names: multimodal configs (Llama 4) keep them under
    text_config; DBRX names them its own way, with attention and FFN fields nested."""
    c = hf["text_config"] if isinstance(hf.get("text_config"), dict) else hf
    if c.get("model_type") != "dbrx":
        return c
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


def family_of(hf: dict) -> str:
    family = text_config(hf).get("model_type", hf.get("model_type"))
    if family == "llama4":
        family = "llama4_text"
    if family not in FAMILIES:
        raise ValueError(f"model_type={family!r} is unsupported: allowed one of {', '.join(FAMILIES)}")
    return family


def _need(cfg: dict, *keys: str):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    raise ValueError(f"config.json lacks {' / '.join(keys)}, which the {cfg.get('model_type')} family needs")


def moe_from_hf(hf: dict) -> tuple[MoEConfig, tuple[int, ...], int | None]:
    """(MoEConfig, MoE layer indices, dense FFN width) of a published family's config."""
    c, family = text_config(hf), family_of(hf)
    n_layers = _need(c, "num_hidden_layers")
    e = _need(c, "num_local_experts", "num_experts", "n_routed_experts")
    k = _need(c, "num_experts_per_tok", "experts_per_token")
    dense = c.get("intermediate_size")
    layers = tuple(range(n_layers))
    kw: dict = {"aux_loss_coef": float(c.get("router_aux_loss_coef", 0.0) or 0.0)}
    spec_kw: dict = {}
    layout = ExpertLayout()
    if family == "mixtral":
        spec_kw, f = {"normalize": True}, _need(c, "intermediate_size")
        kw["jitter"] = float(c.get("router_jitter_noise", 0.0) or 0.0)
    elif family == "dbrx":
        f = _need(c, "intermediate_size")
        p = c.get("moe_normalize_expert_weights")
        spec_kw = {"normalize": p is not None, "normalize_p": float(p or 1.0), "router_dtype": "model"}
        kw["jitter"] = float(c.get("router_jitter_noise") or 0.0)
        activation = {"silu": "silu", "gelu": "gelu", "relu": "relu"}.get(c.get("hidden_act", "silu"))
        if activation is None:
            raise ValueError(f"ffn_act_fn={c.get('hidden_act')!r} is unsupported: allowed silu, gelu, relu")
        layout = ExpertLayout(activation=activation)
    elif family == "phimoe":
        f = _need(c, "intermediate_size")
        spec_kw = {"score_func": "sparsemixer", "sparsemixer_eps": float(c.get("router_jitter_noise", 0.01) or 0.0)}
        kw["jitter"] = float(c.get("input_jitter_noise", 0.0) or 0.0)
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        spec_kw = {"normalize": bool(c.get("norm_topk_prob", False))}
        f = _need(c, "intermediate_size" if family == "olmoe" else "moe_intermediate_size")
        if family == "qwen2_moe" and c.get("shared_expert_intermediate_size"):
            kw.update(num_shared_experts=1, shared_hidden=c["shared_expert_intermediate_size"], shared_gate=True)
        if family != "olmoe":
            layers = place_moe_layers(
                n_layers, step=c.get("decoder_sparse_step", 1) or 1, dense_layers=tuple(c.get("mlp_only_layers") or ())
            )
    elif family in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        f = _need(c, "moe_intermediate_size")
        v3 = family in ("deepseek_v3", "glm4_moe")  # GLM-4.5 routes exactly like DeepSeek-V3
        grouped = v3 or c.get("topk_method") == "group_limited_greedy"
        spec_kw = {
            "score_func": c.get("scoring_func", "sigmoid" if v3 else "softmax"),
            "n_group": (c.get("n_group") or 1) if grouped else 1,
            "topk_group": (c.get("topk_group") or 1) if grouped else 1,
            "group_score": "top2_sum" if v3 else "max",
            "selection_bias": v3,
            "normalize": bool(c.get("norm_topk_prob", v3)),
            "normalize_eps": 1e-20 if v3 else 0.0,
            "scaling_factor": float(c.get("routed_scaling_factor", 1.0) or 1.0),
        }
        if c.get("n_shared_experts"):
            kw.update(num_shared_experts=c["n_shared_experts"], shared_hidden=c["n_shared_experts"] * f)
        kw["aux_loss_coef"] = float(c.get("aux_loss_alpha", 0.0) or 0.0) if not v3 else 0.0
        freq = c.get("moe_layer_freq", 1) or 1
        first = c.get("first_k_dense_replace", 0) or 0
        layers = tuple(i for i in range(n_layers) if i >= first and i % freq == 0)
    elif family == "gpt_oss":
        f = _need(c, "intermediate_size")
        spec_kw = {"softmax_after_topk": True}
        kw["router_bias"] = True
        layout = ExpertLayout(
            gate_up="interleaved",
            transposed=True,
            bias=True,
            activation="clamped_swiglu",
            swiglu_limit=float(c.get("swiglu_limit", 7.0)),
        )
        dense = None
    else:  # llama4_text
        f = _need(c, "intermediate_size")
        spec_kw = {"score_func": "sigmoid", "apply_to": "input"}
        kw.update(num_shared_experts=1, shared_hidden=f)
        layout = ExpertLayout(transposed=True)
        dense = c.get("intermediate_size_mlp")
        moe_layers = c.get("moe_layers")
        step = c.get("interleave_moe_layer_step", 1) or 1
        layers = tuple(moe_layers) if moe_layers is not None else place_moe_layers(n_layers, step=step)
    spec = RoutingSpec(num_experts=e, top_k=k, **spec_kw)
    return MoEConfig(routing=spec, expert_hidden=f, layout=layout, **kw), layers, dense
