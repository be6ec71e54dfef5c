"""What a moekit model is to llama.cpp: the GGUF architecture of each family it runs, the metadata that architecture
reads, and every tensor under its GGUF name in the orientation llama.cpp expects. An architecture computes one fixed
thing (qwen3moe always renormalises the top-k weights, olmoe's key norm spans all heads, ...), so a model that
differs from it in anything llama.cpp does not read is refused with the reason, never written to compute something
else."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moekit.checkpoint.names import GgufArch
from moekit.config.model import ModelConfig
from moekit.families import FAMILIES
from moekit.quant.held import is_quantized

GATING_SOFTMAX, GATING_SIGMOID = 1, 2  # llama.cpp's expert_gating_func values


@dataclass
class GgufTensor:
    """One tensor to write: its GGUF name, what kind of weight it is (which decides its storage type: 'vector' and
    'router' stay fp32; 'matrix', 'experts', 'embedding', 'head' take the export's type) and how to get it in fp32,
    shaped as the gguf package writes it (PyTorch order: ggml's dimensions reversed)."""

    name: str
    kind: str
    get: Callable[[], torch.Tensor]


def arch_for(cfg: ModelConfig) -> GgufArch:
    """What llama.cpp's architecture for cfg's family computes, or ValueError saying why it cannot compute cfg."""
    family = FAMILIES.get(cfg.family)
    arch = family.gguf_arch if family else None
    if arch is None:
        written = ", ".join(f.model_type for f in FAMILIES.values() if f.gguf_arch)
        raise ValueError(f"family {cfg.family!r} has no llama.cpp architecture moekit writes (it writes {written})")
    problems = _differences(cfg, arch)
    if problems:
        raise ValueError(f"llama.cpp's {arch.name} cannot compute this model: {'; '.join(problems)}")
    return arch


def _differences(cfg: ModelConfig, arch: GgufArch) -> list[str]:
    moe, a = cfg.moe, cfg.attention
    spec, layout = moe.routing, moe.layout
    out = []
    if cfg.norm != "rms":
        out.append(f"norm {cfg.norm} (RMSNorm only)")
    if moe.router != "token_choice" or spec.apply_to != "output":
        out.append("a router other than token choice with weights on the expert outputs")
    if a.clip_qkv is not None or a.nope_layers or a.temperature_tuning or a.chunk_size or a.partial_rotary != 1.0:
        out.append("attention with clip_qkv / NoPE layers / temperature tuning / chunks / partial rotary")
    own_heads = a.sliding_kv_heads is not None or (a.kind == "gqa" and a.v_head_dim) or a.value_scale != 1.0
    if a.index_topk or a.query_scale_beta or own_heads:
        out.append("sparse attention / position-scaled queries / value heads or KV heads of their own")
    if cfg.rope_scaling is not None and cfg.rope_scaling.type not in ("linear", "yarn"):
        out.append(f"rope scaling {cfg.rope_scaling.type} (linear or yarn)")
    if cfg.lm_head_bias:
        out.append("a bias on the output head")
    dense = len(cfg.moe_layers) < cfg.num_layers
    leading = cfg.moe_layers == tuple(range(cfg.num_layers - len(cfg.moe_layers), cfg.num_layers))
    if arch.mla:
        if a.kind != "mla" or not a.rope_interleave:
            out.append("attention other than MLA with interleaved rope")
        if dense and not leading:
            out.append("dense layers other than the leading ones")
        if spec.score_func not in ("softmax", "sigmoid") or spec.softmax_after_topk:
            out.append("scores other than softmax / sigmoid before top-k")
        if spec.n_group > 1 and spec.group_score != "top2_sum":
            out.append("groups scored by their best expert (llama.cpp sums each group's top two)")
        if moe.shared_gate:
            out.append("a gated shared expert")
    else:
        if a.kind != "gqa":
            out.append("MLA attention")
        if dense:
            out.append("dense FFN layers (every layer must be MoE)")
        if spec.n_group > 1 or spec.selection_bias or spec.scaling_factor != 1.0 or spec.score_func != "softmax":
            out.append("group-limited / biased / scaled / non-softmax routing")
    if arch.oai:
        want = dict(gate_up="interleaved", bias=True, activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=7.0)
        if any(getattr(layout, k) != v for k, v in want.items()) or not (a.sinks and moe.router_bias):
            out.append("experts other than GPT-OSS's clamped SwiGLU with biases, sinks and a router bias")
        if not spec.softmax_after_topk:
            out.append("softmax before top-k (GPT-OSS takes it over the chosen experts)")
        even = tuple("sliding" if i % 2 == 0 else "full" for i in range(cfg.num_layers))
        if a.sliding_window is None or tuple(a.layer_types or ()) != even:
            out.append("a layer pattern other than sliding-window on even layers, full on odd ones")
    else:
        if layout != type(layout)() or moe.router_bias:
            out.append(f"experts other than SwiGLU without biases ({layout.describe()})")
        if a.sinks or a.sliding_window is not None or a.out_bias:
            out.append("attention sinks, sliding windows or an output bias")
    renormalised = spec.softmax_after_topk or spec.normalize
    if arch.renormalised is not None and renormalised != arch.renormalised:
        out.append(f"top-k weights {'not ' * arch.renormalised}renormalised")
    if bool(moe.num_shared_experts) != arch.shared or (arch.shared and not arch.mla and not moe.shared_gate):
        out.append("shared experts " + ("required" if arch.shared else "not supported"))
    if a.qk_norm != arch.qk_norm:
        out.append(f"query/key norm {a.qk_norm} ({arch.qk_norm} here)")
    if arch.full_kv_heads and cfg.num_kv_heads != cfg.num_heads:
        out.append("grouped-query attention (the key norm spans the full width)")
    if a.qkv_bias and not arch.qkv_bias:
        out.append("biases on q/k/v")
    return out


def metadata(cfg: ModelConfig, arch: GgufArch) -> list[tuple[str, object]]:
    """(GGUFWriter method, value) pairs of the architecture's hyperparameters."""
    moe, a = cfg.moe, cfg.attention
    kv = [
        ("add_block_count", cfg.num_layers),
        ("add_context_length", cfg.max_position),
        ("add_embedding_length", cfg.hidden_size),
        ("add_feed_forward_length", cfg.dense_hidden or moe.expert_hidden),
        ("add_head_count", cfg.num_heads),
        ("add_head_count_kv", cfg.num_kv_heads if a.kind == "gqa" else cfg.num_heads),
        ("add_rope_freq_base", cfg.rope_theta),
        ("add_layer_norm_rms_eps", cfg.norm_eps),
        ("add_expert_count", moe.routing.num_experts),
        ("add_expert_used_count", moe.routing.top_k),
        ("add_expert_feed_forward_length", moe.expert_hidden),
        ("add_vocab_size", cfg.vocab_size),
        ("add_rope_dimension_count", cfg.rope_dim),
    ]
    if a.kind == "gqa":
        kv += [("add_key_length", cfg.head_dim), ("add_value_length", cfg.head_dim)]
    if moe.num_shared_experts:
        kv.append(("add_expert_shared_feed_forward_length", moe.shared_width))
    if arch.oai:
        kv.append(("add_sliding_window", a.sliding_window))
    if arch.mla:
        spec = moe.routing
        kv += [
            ("add_leading_dense_block_count", cfg.num_layers - len(cfg.moe_layers)),
            ("add_kv_lora_rank", a.kv_lora_rank),
            ("add_key_length", a.qk_nope_head_dim + a.qk_rope_head_dim),
            ("add_value_length", a.v_head_dim),
            ("add_expert_shared_count", moe.num_shared_experts),
            ("add_expert_weights_scale", spec.scaling_factor),
            ("add_expert_weights_norm", spec.normalize),
            ("add_expert_gating_func", GATING_SIGMOID if spec.score_func == "sigmoid" else GATING_SOFTMAX),
            ("add_expert_group_count", spec.n_group),
            ("add_expert_group_used_count", spec.topk_group),
        ]
        kv.append(("add_q_lora_rank", a.q_lora_rank or 0))  # 0: a plain q projection (llama.cpp requires the key)
    rs = cfg.rope_scaling
    if rs is not None:
        kv += [("add_rope_scaling_type", rs.type), ("add_rope_scaling_factor", rs.factor)]
        if rs.type == "yarn":
            orig = rs.original_max_position or cfg.max_position
            kv += [
                ("add_rope_scaling_orig_ctx_len", orig),
                ("add_rope_scaling_yarn_beta_fast", rs.beta_fast),
                ("add_rope_scaling_yarn_beta_slow", rs.beta_slow),
            ]
            if arch.mla and rs.mscale_all_dim:
                kv.append(("add_rope_scaling_yarn_log_mul", 0.1 * rs.mscale_all_dim))
    return kv


def _float(module: nn.Module, base: str = "weight") -> torch.Tensor:
    """A weight in fp32, dequantized where the module holds it quantized."""
    if is_quantized(module) and base in module.held_weights():
        return module.dequantized(base, torch.float32)
    return getattr(module, base).detach().float()


def _rope_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q/k reordered from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1), which llama.cpp's
    llama architecture rotates (the permutation of llama.cpp's own converter)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _experts(prefix: str, experts: nn.Module) -> Iterator[GgufTensor]:
    """ffn_{gate,up,down}_exps as [E, F, D] / [E, D, F] (and their biases) from any stacked layout."""
    layout = experts.layout  # a QuantizedExperts' layout is never transposed: it holds output-major parts

    def stacked(base: str) -> torch.Tensor:
        w = _float(experts, base)
        return w.transpose(1, 2) if layout.transposed else w

    def half(t: torch.Tensor, which: int, axis: int) -> torch.Tensor:
        """Gate (0) or up (1) of a stacked gate/up tensor along axis."""
        if layout.gate_up == "interleaved":
            index = [slice(None)] * t.ndim
            index[axis] = slice(which, None, 2)
            return t[tuple(index)].contiguous()
        return t.chunk(2, dim=axis)[which].contiguous()

    yield GgufTensor(f"{prefix}.ffn_gate_exps.weight", "experts", lambda: half(stacked("gate_up_proj"), 0, 1))
    yield GgufTensor(f"{prefix}.ffn_up_exps.weight", "experts", lambda: half(stacked("gate_up_proj"), 1, 1))
    yield GgufTensor(f"{prefix}.ffn_down_exps.weight", "experts", lambda: stacked("down_proj"))
    if layout.bias:
        bias = experts.gate_up_proj_bias
        yield GgufTensor(f"{prefix}.ffn_gate_exps.bias", "vector", lambda: half(bias.detach().float(), 0, 1))
        yield GgufTensor(f"{prefix}.ffn_up_exps.bias", "vector", lambda: half(bias.detach().float(), 1, 1))
        yield GgufTensor(f"{prefix}.ffn_down_exps.bias", "vector", lambda: experts.down_proj_bias.detach().float())


def _linear(name: str, module: nn.Module, kind: str = "matrix", fix=None) -> Iterator[GgufTensor]:
    yield GgufTensor(f"{name}.weight", kind, (lambda: fix(_float(module))) if fix else (lambda: _float(module)))
    if getattr(module, "bias", None) is not None:
        yield GgufTensor(
            f"{name}.bias",
            "vector",
            (lambda: fix(module.bias.detach().float())) if fix else (lambda: module.bias.detach().float()),
        )


def _vector(name: str, t: torch.Tensor) -> GgufTensor:
    return GgufTensor(name, "vector", lambda: t.detach().float())


def _attention(p: str, attn: nn.Module, cfg: ModelConfig, arch: GgufArch) -> Iterator[GgufTensor]:
    if cfg.attention.kind == "mla":
        if hasattr(attn, "q_proj"):
            yield from _linear(f"{p}.attn_q", attn.q_proj)
        else:
            yield from _linear(f"{p}.attn_q_a", attn.q_a_proj)
            yield _vector(f"{p}.attn_q_a_norm.weight", attn.q_a_layernorm.weight)
            yield from _linear(f"{p}.attn_q_b", attn.q_b_proj)
        yield from _linear(f"{p}.attn_kv_a_mqa", attn.kv_a_proj_with_mqa)
        yield _vector(f"{p}.attn_kv_a_norm.weight", attn.kv_a_layernorm.weight)
        yield from _linear(f"{p}.attn_kv_b", attn.kv_b_proj)
    else:
        q_fix = k_fix = None
        if arch.rope_pairs:
            q_fix = lambda w: _rope_pairs(w, cfg.num_heads)
            k_fix = lambda w: _rope_pairs(w, cfg.num_kv_heads)
        yield from _linear(f"{p}.attn_q", attn.q_proj, fix=q_fix)
        yield from _linear(f"{p}.attn_k", attn.k_proj, fix=k_fix)
        yield from _linear(f"{p}.attn_v", attn.v_proj)
        if attn.q_norm is not None:
            yield _vector(f"{p}.attn_q_norm.weight", attn.q_norm.weight)
            yield _vector(f"{p}.attn_k_norm.weight", attn.k_norm.weight)
        if attn.sinks is not None:
            yield _vector(f"{p}.attn_sinks.weight", attn.sinks)
    yield from _linear(f"{p}.attn_output", attn.o_proj)


def gguf_tensors(model: nn.Module, arch: GgufArch) -> Iterator[GgufTensor]:
    """Every tensor of the model under its GGUF name, in llama.cpp's order (embedding, layers, norm, head)."""
    cfg = model.config
    yield GgufTensor("token_embd.weight", "embedding", lambda: model.embed_tokens.weight.detach().float())
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}"
        yield _vector(f"{p}.attn_norm.weight", layer.input_layernorm.weight)
        yield from _attention(p, layer.self_attn, cfg, arch)
        post = "post_attention_norm" if arch.oai else "ffn_norm"
        yield _vector(f"{p}.{post}.weight", layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        if not cfg.is_moe_layer(i):
            for hf, ours in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                yield from _linear(f"{p}.{ours}", getattr(mlp, hf))
            continue
        yield from _linear(f"{p}.ffn_gate_inp", mlp.router, kind="router")
        if getattr(mlp.router, "selection_bias_E", None) is not None and cfg.moe.routing.selection_bias:
            yield _vector(f"{p}.exp_probs_b.bias", mlp.router.selection_bias_E)
        yield from _experts(p, mlp.experts)
        if mlp.shared_experts is not None:
            shared = mlp.shared_experts
            for hf, ours in (
                ("gate_proj", "ffn_gate_shexp"),
                ("up_proj", "ffn_up_shexp"),
                ("down_proj", "ffn_down_shexp"),
            ):
                yield from _linear(f"{p}.{ours}", getattr(shared, hf))
        if mlp.shared_expert_gate is not None:
            gate = mlp.shared_expert_gate
            yield GgufTensor(f"{p}.ffn_gate_inp_shexp.weight", "vector", lambda g=gate: _float(g).reshape(-1))
    yield _vector("output_norm.weight", model.norm.weight)
    # Where the head is tied, the architectures that require an output tensor get a copy of the embedding.
    head = model.embed_tokens if cfg.tie_embeddings else model.lm_head
    if not cfg.tie_embeddings or arch.head_required:
        yield GgufTensor("output.weight", "head", lambda: _float(head))
