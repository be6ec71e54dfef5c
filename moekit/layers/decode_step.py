"""Decode at batch 1 in few calls: a whole model step in one call where every layer allows it (DecodeChain), else
two calls per layer, each a whole block: attention (norm, projections, QK-norm, rope, cache write, attention,
output projection, residual) and FFN (norm, router, top-k routing, the k experts and the shared expert, combine,
residual; or a dense FFN), in moekit's C++ kernels (csrc/decode*.cpp). At inference an MoE block over any batch of
tokens is one call too (moe_block_step; csrc/ffn_tokens.cpp).

Eager PyTorch runs each block as some 50-60 small operators; at one token each costs its fixed few microseconds
(tens of microseconds with caches cold from streaming the weights), which on a small model adds up to more than
reading the block's weights; even the two calls per layer and their Python cost a tenth of a small MoE model's step.
The modules stay the reference: these paths are taken only where they compute the same thing (a plain causal step
with a cache, fp32 on the CPU, a layer whose variant they cover) and the kernels are there, else the caller runs the
modules.

What a block's call needs besides the token (its weights, flags) is gathered and checked once into a C++ object
kept in a plan beside the module: gathering it anew costs some 40 us per block, a tenth of a small model's step. A
plan stays valid until any module anywhere registers a parameter, buffer or submodule (torch's global registration
hooks count them), so replacing a weight can never leave a plan reading the old one; changing a weight in place
needs nothing. Plans live beside the modules, not in them: copying, pickling or saving a model never sees them."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from moekit.experts import gemv
from moekit.experts.layout import ACTIVATIONS
from moekit.layers.attention import Attention, AttentionInputs
from moekit.layers.ffn import FeedForward
from moekit.layers.moe import MoEBlock, MoEInfo
from moekit.layers.norm import RMSNorm

_NONE = torch.empty(0)
_registrations = [0]
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (key, plan); outside the module's state


def _count_registration(*_args) -> None:
    _registrations[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_count_registration)
nn.modules.module.register_module_buffer_registration_hook(_count_registration)
nn.modules.module.register_module_module_registration_hook(_count_registration)


def _plan(module: nn.Module, build, *args):
    """The module's cached plan made by `build` (None: that path does not apply to it), rebuilt when anything was
    re-registered."""
    key = _registrations[0]
    plans = _plans.setdefault(module, {})
    cached = plans.get(build)
    if cached is None or cached[0] != key:
        cached = plans[build] = (key, build(*args))
    return cached[1]


def _kernel(*tensors: torch.Tensor):
    """The kernels where they are built and take these tensors (fp32 on the CPU, contiguous), else None. No size
    threshold: at one token a block's kernel call beats its eager operators at any size."""
    return gemv.kernel_taking(*tensors) if all(t.is_contiguous() for t in tensors) else None


def _one_token_fp32(x_BTD: torch.Tensor) -> bool:
    return x_BTD.shape[0] == 1 and x_BTD.shape[1] == 1 and x_BTD.dtype == torch.float32 and x_BTD.is_cpu


def _inference(block: nn.Module) -> bool:
    """A block in a state the one-call steps compute as its forward does (no training, the default backend)."""
    return not block.training and (not isinstance(block, MoEBlock) or block.backend.name == "grouped")


def attention_step(norm: nn.Module, attn: nn.Module, x_BTD: torch.Tensor, inputs: AttentionInputs):
    """x + attn(norm(x)) for one token (x [1, 1, D]) in one kernel call, or None where that path does not apply."""
    cache = inputs.cache
    if (
        cache is None
        or not _one_token_fp32(x_BTD)
        or torch.is_grad_enabled()
        or inputs.masks["full"] is not None  # padding: the modules build the mask
        or not isinstance(attn, Attention)
        or not cache.has(attn.layer)
    ):
        return None
    step = _plan(attn, _attention_plan, norm, attn)
    if step is None:
        return None
    cos, sin = (r.view(-1) for r in inputs.rope) if attn.use_rope else (_NONE, _NONE)
    k_cache, v_cache = cache.room(attn.layer, 1)
    y_D = step(x_BTD.view(-1), cos, sin, k_cache, v_cache, cache.length, torch.get_num_threads())
    return y_D.view(1, 1, -1)


def _attention_plan(norm: nn.Module, attn: Attention):
    """The block's C++ step (AttentionDecode), or None where it does not cover the block."""
    if not (isinstance(attn, Attention) and attn.fusable and isinstance(norm, RMSNorm)):
        return None
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    weights = [lin.weight for lin in linears]
    kernel = _kernel(*weights, norm.weight)
    if kernel is None:
        return None
    biases = [_NONE if lin.bias is None else lin.bias for lin in linears]
    return kernel.AttentionDecode(
        norm.weight,
        norm.eps,
        weights[:3],
        biases[:3],
        attn.head_dim,
        _NONE if attn.q_norm is None else attn.q_norm.weight,
        _NONE if attn.k_norm is None else attn.k_norm.weight,
        attn.qk_norm == "full",
        attn.norm_eps,
        attn.clip_qkv or 0.0,
        attn.window or 0,
        attn.scale,
        _NONE if attn.sinks is None else attn.sinks,
        weights[3],
        biases[3],
    )


def ffn_step(norm: nn.Module, ffn: nn.Module, x_BTD: torch.Tensor):
    """(x + ffn(norm(x)), its MoEInfo or None for a dense FFN) for one token (x [1, 1, D]) in one kernel call, or
    None where that path does not apply (training, another backend chosen, a variant the kernel does not cover)."""
    if not _one_token_fp32(x_BTD) or torch.is_grad_enabled() or not _inference(ffn):
        return None
    step = _plan(ffn, _ffn_plan, norm, ffn)
    if step is None:
        return None
    return _run_ffn(step, ffn, x_BTD)


def moe_block_step(block: MoEBlock, x_BTD: torch.Tensor):
    """(block(x), its MoEInfo) for any number of tokens (x [B, T, D]) in one kernel call (the block alone, with no
    norm or residual around it), or None where that path does not apply, as ffn_step. One token is a decode step;
    more run as one segment per expert (ffn_tokens.cpp), saving the operators around the expert products."""
    if x_BTD.dtype != torch.float32 or not x_BTD.is_cpu or torch.is_grad_enabled() or not _inference(block):
        return None
    step = _plan(block, _block_plan, block)
    if step is None:
        return None
    if x_BTD.shape[0] * x_BTD.shape[1] == 1:
        return _run_ffn(step, block, x_BTD)
    y_TD, ids_TK, counts_E = step.tokens(x_BTD.reshape(-1, x_BTD.shape[-1]).contiguous(), torch.get_num_threads())
    return y_TD.view(x_BTD.shape), _routed_info(block, counts_E, ids_TK)


def _run_ffn(step, ffn: nn.Module, x_BTD: torch.Tensor):
    y_D, ids_K, counts_E = step(x_BTD.view(-1), torch.get_num_threads())
    info = _routed_info(ffn, counts_E, ids_K.view(1, -1)) if isinstance(ffn, MoEBlock) else None
    return y_D.view(1, 1, -1), info


def _routed_info(block: MoEBlock, counts_E: torch.Tensor, ids_TK: torch.Tensor) -> MoEInfo:
    """A fused step's MoEInfo: dropless, no balancing loss (inference)."""
    return MoEInfo(counts_E, ids_TK.numel(), 0, counts_E.new_zeros((), dtype=torch.float32), ids_TK)


def _ffn_plan(norm: nn.Module, ffn: nn.Module):
    """The block's C++ step (FfnDecode: an MoE block, or a dense FFN as its shared-expert part alone), or None."""
    if not isinstance(norm, RMSNorm):
        return None
    if isinstance(ffn, FeedForward):
        if ffn.layout.bias:
            return None
        return _ffn_decode(norm, None, ffn, None)
    return _block_plan(ffn, norm)


def _block_plan(block: nn.Module, norm: RMSNorm | None = None):
    """An MoE block's C++ step (FfnDecode), after `norm` and with the residual when given one; or None."""
    if not (isinstance(block, MoEBlock) and block.fusable):
        return None
    return _ffn_decode(norm, block, block.shared_experts, block.shared_expert_gate)


def _ffn_decode(norm: RMSNorm | None, block: MoEBlock | None, dense: FeedForward | None, dense_gate: nn.Linear | None):
    layout = (block.experts if block is not None else dense).layout
    shared = [_NONE] * 4
    if dense is not None:
        gate = _NONE if dense.gate_proj is None else dense.gate_proj.weight
        sigmoid = _NONE if dense_gate is None else dense_gate.weight
        shared = [gate, dense.up_proj.weight, dense.down_proj.weight, sigmoid]
    routing = [_NONE, _NONE, _NONE, False, False, 0, False, 0.0, 1.0, False, _NONE, _NONE, _NONE, _NONE]
    if block is not None:
        spec, experts, router = block.router.spec, block.experts, block.router
        routing = [
            router.weight,
            _NONE if router.bias is None else router.bias,
            _NONE if router.selection_bias_E is None else router.selection_bias_E,
            spec.score_func == "sigmoid",
            spec.softmax_after_topk,
            spec.top_k,
            spec.normalize,
            spec.normalize_eps,
            spec.scaling_factor,
            spec.apply_to == "input",
            experts.gate_up_proj,
            experts.down_proj,
            experts.gate_up_proj_bias if layout.bias else _NONE,
            experts.down_proj_bias if layout.bias else _NONE,
        ]
    norm_args = [_NONE, 0.0, False] if norm is None else [norm.weight, norm.eps, True]  # with a norm: the residual
    kernel = _kernel(*(t for t in [norm_args[0], *routing, *shared] if isinstance(t, torch.Tensor) and t.numel()))
    if kernel is None:
        return None
    layout_args = [
        layout.transposed,
        layout.gated,
        layout.gate_up == "interleaved",
        ACTIVATIONS.index(layout.activation),
        layout.swiglu_alpha,
        layout.swiglu_limit,
    ]
    return kernel.FfnDecode(*norm_args, *routing, *layout_args, *shared)


def chain_step(model: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor | None:
    """The logits [1, 1, V] of one decode step of the whole model (embedding, every layer, final norm, output head)
    in one kernel call, or None where that path does not apply to the model or the step."""
    if (
        input_ids.shape != (1, 1)
        or input_ids.dtype != torch.long
        or torch.is_grad_enabled()
        or cache.length == 0  # a prompt: the modules
        or input_ids.device.type != "cpu"
    ):
        return None
    plan = _plan(model, _chain_plan, model)
    if plan is None or not all(_inference(layer.mlp) for layer in model.layers):
        return None
    chain, cached_layers = plan
    if not all(cache.has(i) for i in cached_layers):
        return None
    rooms = [cache.room(i, 1) for i in cached_layers]
    inv_freq, factor = model.rotary.frequencies(cache.length + 1)
    logits = chain.step(
        input_ids,
        cache.length,
        inv_freq,
        factor,
        [k for k, _ in rooms],
        [v for _, v in rooms],
        torch.get_num_threads(),
    )
    cache.length += 1
    return logits


def _chain_plan(model: nn.Module):
    """(the model's C++ step, the cache index of each layer's attention), or None where a part is not covered."""
    layers = model.layers
    if not isinstance(model.norm, RMSNorm):
        return None
    attention = [_plan(layer.self_attn, _attention_plan, layer.input_layernorm, layer.self_attn) for layer in layers]
    ffn = [_plan(layer.mlp, _ffn_plan, layer.post_attention_layernorm, layer.mlp) for layer in layers]
    head, embed = model.lm_head, model.embed_tokens.weight
    kernel = _kernel(embed, model.norm.weight, head.weight, model.rotary.inv_freq)
    if kernel is None or any(step is None for step in attention + ffn):
        return None
    chain = kernel.DecodeChain(
        embed,
        attention,
        ffn,
        [layer.self_attn.use_rope for layer in layers],
        model.norm.weight,
        model.norm.eps,
        head.weight,
        _NONE if head.bias is None else head.bias,
    )
    return chain, [layer.self_attn.layer for layer in layers]
