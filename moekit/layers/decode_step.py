"""Decode at batch 1 in two calls per layer: the whole attention block (norm, projections, QK-norm, rope, cache
write, attention, output projection, residual) and the whole MoE block (norm, router, top-k routing, the k experts
and the shared expert, combine, residual), each one call of moekit's C++ kernels (csrc/decode_attention.cpp,
csrc/decode_moe.cpp).

Eager PyTorch runs each block as some 50-60 small operators; at one token each costs its fixed few microseconds (more
with caches cold from streaming the weights), which on a small model adds up to more than reading the block's
weights. The modules stay the reference: this path is taken only where it computes the same thing (a plain
causal step with a cache, fp32 on the CPU, a layer whose variant it covers) and the kernel is there, else the
caller runs the modules.

What a block's call needs besides the token (its weights, flags, the kernel) is gathered once into a plan kept on
the module: gathering it anew costs some 40 us per block, a tenth of a small model's step. A plan stays valid until
any module anywhere registers a parameter, buffer or submodule (torch's global registration hooks count them), so
replacing a weight can never leave a plan reading the old one; changing a weight in place needs nothing. Plans
live beside the modules, not in them: copying, pickling or saving a model never sees them."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from moekit.experts import gemv
from moekit.experts.layout import ACTIVATIONS
from moekit.layers.attention import Attention, AttentionInputs
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
    """The module's cached plan (None: this path does not apply to it), rebuilt when anything was re-registered or
    the kernel size threshold changed."""
    key = (_registrations[0], gemv.MIN_KERNEL_BYTES)
    cached = _plans.get(module)
    if cached is None or cached[0] != key:
        cached = _plans[module] = (key, build(*args))
    return cached[1]


def _one_token_fp32(x_BTD: torch.Tensor) -> bool:
    return x_BTD.shape[0] == 1 and x_BTD.shape[1] == 1 and x_BTD.dtype == torch.float32 and x_BTD.is_cpu


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
    plan = _plan(attn, _attention_plan, norm, attn)
    if plan is None:
        return None
    kernel, args = plan
    cos, sin = (r.view(-1) for r in inputs.rope) if attn.use_rope else (_NONE, _NONE)
    k_cache, v_cache = cache.room(attn.layer, 1)
    y_D = kernel.attention_decode(
        x_BTD.view(-1), cos, sin, k_cache[0], v_cache[0], cache.length, torch.get_num_threads(), *args
    )
    return y_D.view(1, 1, -1)


def _attention_plan(norm: nn.Module, attn: Attention):
    if not (attn.fusable and isinstance(norm, RMSNorm)):
        return None
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    weights = [lin.weight for lin in linears]
    kernel = gemv.kernel_for(sum(w.numel() for w in weights) * 4, *weights, norm.weight)
    if kernel is None or not all(w.is_contiguous() for w in weights):
        return None
    biases = [_NONE if lin.bias is None else lin.bias for lin in linears]
    args = (
        norm.weight,
        norm.eps,
        weights[:3],
        biases[:3],
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
    return kernel, args


def moe_step(norm: nn.Module, block: nn.Module, x_BTD: torch.Tensor):
    """(x + block(norm(x)), its MoEInfo) for one token (x [1, 1, D]) in one kernel call, or None where that path
    does not apply (training, another backend chosen, a routing or layout the kernel does not cover)."""
    if (
        not _one_token_fp32(x_BTD)
        or torch.is_grad_enabled()
        or not isinstance(block, MoEBlock)
        or block.training
        or block.backend.name != "grouped"
    ):
        return None
    plan = _plan(block, _moe_plan, norm, block)
    if plan is None:
        return None
    kernel, top_k, args = plan
    y_D, ids_K, counts_E = kernel.moe_decode(x_BTD.view(-1), torch.get_num_threads(), *args)
    info = MoEInfo(counts_E, top_k, 0, x_BTD.new_zeros((), dtype=torch.float32), ids_K.view(1, -1))
    return y_D.view(1, 1, -1), info


def _moe_plan(norm: nn.Module, block: MoEBlock):
    if not (block.fusable and isinstance(norm, RMSNorm)):
        return None
    spec, experts, router = block.cfg.routing, block.experts, block.router
    layout = experts.layout
    up, down = experts.gate_up_proj, experts.down_proj
    kernel = gemv.kernel_for(spec.top_k * (up[0].numel() + down[0].numel()) * 4, up, down, router.weight, norm.weight)
    if kernel is None or not (up.is_contiguous() and down.is_contiguous()):
        return None
    shared = block.shared_experts
    shared_weights = [_NONE] * 4
    if shared is not None:
        gate = _NONE if shared.gate_proj is None else shared.gate_proj.weight
        sigmoid = _NONE if block.shared_expert_gate is None else block.shared_expert_gate.weight
        shared_weights = [gate, shared.up_proj.weight, shared.down_proj.weight, sigmoid]
    args = (
        norm.weight,
        norm.eps,
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
        up,
        down,
        experts.gate_up_proj_bias if layout.bias else _NONE,
        experts.down_proj_bias if layout.bias else _NONE,
        layout.transposed,
        layout.gated,
        layout.gate_up == "interleaved",
        ACTIVATIONS.index(layout.activation),
        layout.swiglu_alpha,
        layout.swiglu_limit,
        *shared_weights,
    )
    return kernel, spec.top_k, args
