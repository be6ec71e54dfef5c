"""moekit's fused inference steps, installed on a model from outside: prepare_inference(model).

At inference moekit's C++ kernels (moekit/kernels/csrc/decode*.cpp, ffn_tokens.cpp) run a whole block in one call:
a decode step's attention block (norm, projections, QK-norm, rope, cache write, attention, output projection,
residual) and FFN block (norm, router, top-k routing, the k experts and the shared expert, combine, residual; or a
dense FFN), a whole model's decode step at batch 1 (DecodeChain), and an MoE block over any batch of tokens. Eager
PyTorch runs each block as some 50-60 small operators, each with a fixed cost of a few microseconds (tens with the
caches cold from streaming the weights), which at one token of a small model adds up to more than reading the
block's weights.

The modules stay the pure PyTorch reference. prepare_inference builds each step from the live modules (the router's
spec, the norms' eps, the weights), installs it where it computes exactly what the module computes, and leaves the
rest to the modules; each step still declines a call it does not cover (training, gradients, another dtype or
device, a padding mask, another backend) and the module runs. The steps hold the weights they were built from:
after replacing a weight or changing a setting, call prepare_inference again (generate does, on every call) or
model.drop_fused(); changing the backend, the dtype or device, or loading a state dict drops them by itself.
Changing a weight in place needs nothing."""

from __future__ import annotations

import torch
from torch import nn

from moekit.dispatch.local import LocalDispatcher
from moekit.experts.backends import is_default
from moekit.experts.layout import ACTIVATIONS
from moekit.experts.mixed import MixedExperts
from moekit.experts.quantized import QuantizedExperts
from moekit.infer.slots import SlotView
from moekit.kernels import kernel_taking
from moekit.kernels.quantized import covers, quant_weights
from moekit.layers.attention import Attention, AttentionInputs
from moekit.layers.compressed import CompressedAttention
from moekit.layers.ffn import FeedForward
from moekit.layers.mla import LatentAttention
from moekit.layers.moe import MoEBlock, MoEInfo
from moekit.layers.norm import RMSNorm
from moekit.layers.rope import RotaryEmbedding
from moekit.quant.held import is_quantized
from moekit.routing.router import TokenChoiceRouter, TokenTableRouter

_NONE = torch.empty(0)
KERNEL_SCORES = ("softmax", "sigmoid", "sqrtsoftplus")  # the FFN step's score functions, in its numbering


class _Installed:
    """A step installed on a module: copies and pickles of the module do not carry it (it holds C++ objects)."""

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())


def prepare_inference(model: nn.Module) -> dict:
    """Install the fused steps on a MoEDecoder's modules wherever they cover them, replacing any installed before.
    Returns {"attention": [layer], "ffn": [layer], "moe": [layer], "chain": bool}: the layers (multi-token-prediction
    layers after the main ones) whose attention block, FFN block (decode) and MoE block (any batch of tokens) have
    a fused step, and whether the whole decode step is one call."""
    model.drop_fused()
    report: dict = {"attention": [], "ffn": [], "moe": [], "chain": False}
    layers = [*model.layers, *(m.layer for m in model.mtp)]
    steps = []
    for i, layer in enumerate(layers):
        if isinstance(layer.mlp, MoEBlock) and prepare_block(layer.mlp):
            report["moe"].append(i)
        if layer.residual_multiplier != 1.0:  # the layer steps add the residual unscaled (muP): the modules
            steps.append((None, None))
            continue
        attention = attention_step(layer.input_layernorm, layer.self_attn, model.rotary)
        ffn = ffn_step(layer.post_attention_layernorm, layer.mlp, residual=not layer.hyper)  # hyper: mixed instead
        steps.append((attention, ffn))
        if attention is not None or ffn is not None:
            layer.fused = _LayerSteps(attention, ffn)
        report["attention"] += [i] if attention is not None else []
        report["ffn"] += [i] if ffn is not None else []
    main = steps[: len(model.layers)]
    if model.config.mup:  # the chain's embedding and head take no multipliers
        return report
    chain = _chain(model, main) if model.hc_head is None else _hyper_chain(model, main)
    if chain is not None:
        model.fused = _ChainStep(model, chain)
        report["chain"] = True
    return report


def prepare_block(block: MoEBlock) -> bool:
    """Install the fused step on one MoE block (used alone, outside a model); whether it covers the block."""
    block.__dict__.pop("fused", None)
    step = block_step(block)
    if step is not None:
        block.fused = step
    return step is not None


def _kernel(*tensors: torch.Tensor):
    """The kernels where they are built and take these tensors (fp32 on the CPU, contiguous), else None. No size
    threshold: at one token a block's kernel call beats its eager operators at any size."""
    return kernel_taking(*tensors) if all(t.is_contiguous() for t in tensors) else None


def _one_token_fp32(x_BTD: torch.Tensor) -> bool:
    return x_BTD.shape[0] == 1 and x_BTD.shape[1] == 1 and x_BTD.dtype == torch.float32 and x_BTD.is_cpu


def _inference(block: nn.Module) -> bool:
    """A block in a state the fused steps compute as its forward does (no training, the default backend)."""
    return not block.training and (not isinstance(block, MoEBlock) or is_default(block.backend))


def _or_none(tensor: torch.Tensor | None) -> torch.Tensor:
    return _NONE if tensor is None else tensor


def _linear_parts(linear: nn.Module | None) -> tuple[torch.Tensor, object] | None:
    """(fp32 weight, None) of a float linear layer, (_NONE, its QuantWeights) of a quantized one the kernels read,
    None where they read neither (another format or shape, int8 activations switched off); (_NONE, None) for none."""
    if linear is None:
        return _NONE, None
    if not is_quantized(linear):
        return linear.weight, None
    if not (linear.int8_activations and covers(linear, "weight")):
        return None
    q = quant_weights(linear, "weight")
    return (_NONE, q) if q is not None else None


def _linears_covered(*linears: nn.Module | None) -> bool:
    return all(_linear_parts(lin) is not None for lin in linears)


class _AttentionStep(_Installed):
    """x + attn(norm(x)) for one token (x [1, 1, D]) with a cache, or one token of each row of a server's batch
    (fp32 weights), or None where this step does not apply."""

    def __init__(self, attn: Attention | LatentAttention, step, rows: bool):
        self.attn, self.step, self.rows = attn, step, rows
        self.latent = isinstance(attn, LatentAttention)  # MlaDecode takes its caches as one list

    def __call__(self, x_BTD: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor | None:
        cache, attn = inputs.cache, self.attn
        if cache is None or torch.is_grad_enabled() or not cache.has(attn.layer):
            return None
        if isinstance(cache, SlotView) and x_BTD.shape[0] > 1:  # a server's batch, each row at its own position
            return self._rows(x_BTD, inputs, cache)
        if not _one_token_fp32(x_BTD) or inputs.masks["full"] is not None:  # padding: the modules build the mask
            return None
        cos, sin = (r.view(-1) for r in inputs.rope_of(attn.layer_type)) if attn.use_rope else (_NONE, _NONE)
        y_D = self.step(x_BTD.view(-1), cos, sin, *self._caches(cache), cache.length, torch.get_num_threads())
        return y_D.view(1, 1, -1)

    def _caches(self, cache) -> list:
        """The step's cache arguments, with room for one more token: keys and values (GQA), or one list (MLA)."""
        rooms = cache.room(self.attn.layer, 1)
        return [rooms] if self.latent else rooms

    def _rows(self, x_BTD: torch.Tensor, inputs: AttentionInputs, cache: SlotView) -> torch.Tensor | None:
        """One token of each row (B rows, fp32 weights): the step's rows form, each row's key and value written at
        that row's own length, its attention over its own keys (what the per-row causal mask allows)."""
        b, t, _ = x_BTD.shape
        if t != 1 or x_BTD.dtype != torch.float32 or not x_BTD.is_cpu or not self.rows:
            return None
        rope = inputs.rope_of(self.attn.layer_type)
        cos, sin = (r.reshape(b, -1).contiguous() for r in rope) if self.attn.use_rope else (_NONE, _NONE)
        positions_B = torch.tensor(cache.lengths, dtype=torch.long)
        y_BD = self.step.rows(x_BTD.view(b, -1), cos, sin, *self._caches(cache), positions_B, torch.get_num_threads())
        return y_BD.view(b, 1, -1)


class _FfnStep(_Installed):
    """(x + ffn(norm(x)), its MoEInfo or None for a dense FFN) for one token (x [1, 1, D]) or, with fp32 weights,
    one token of each of B rows (a server's decode batch: each touched expert read once for all of them), or None
    where this step does not apply (training, gradients wanted, another backend chosen)."""

    def __init__(self, ffn: nn.Module, step, rows: bool):
        self.ffn, self.step, self.rows = ffn, step, rows

    def __call__(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, MoEInfo | None] | None:
        if torch.is_grad_enabled() or not _inference(self.ffn):
            return None
        if _one_token_fp32(x_BTD):
            return _run_one_token(self.step, self.ffn, x_BTD)
        b, t, _ = x_BTD.shape
        if not self.rows or t != 1 or x_BTD.dtype != torch.float32 or not x_BTD.is_cpu:
            return None
        y_BD, ids_BK, counts_E = self.step.tokens(x_BTD.view(b, -1).contiguous(), torch.get_num_threads())
        info = _routed_info(counts_E, ids_BK) if isinstance(self.ffn, MoEBlock) else None
        return y_BD.view(b, 1, -1), info


class _LayerSteps(_Installed):
    """A decoder layer's fused blocks (either may be None): what DecoderLayer.fused holds."""

    def __init__(self, attention: _AttentionStep | None, ffn: _FfnStep | None):
        self.attention_step, self.ffn_step = attention, ffn

    def attention(self, x_BTD: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor | None:
        return self.attention_step(x_BTD, inputs) if self.attention_step is not None else None

    def ffn(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, MoEInfo | None] | None:
        return self.ffn_step(x_BTD) if self.ffn_step is not None else None


class _BlockStep(_Installed):
    """(block(x), its MoEInfo) for any number of tokens (x [B, T, D]; the block alone, no norm or residual) at
    inference, or None where this step does not apply: one token is a decode step, more run as one segment per
    expert (ffn_tokens.cpp), saving the operators around the expert products."""

    def __init__(self, block: MoEBlock, step):
        self.block, self.step = block, step

    def __call__(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, MoEInfo] | None:
        if x_BTD.dtype != torch.float32 or not x_BTD.is_cpu or torch.is_grad_enabled() or not _inference(self.block):
            return None
        if x_BTD.shape[0] * x_BTD.shape[1] == 1:
            return _run_one_token(self.step, self.block, x_BTD)
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1]).contiguous()
        y_TD, ids_TK, counts_E = self.step.tokens(x_TD, torch.get_num_threads())
        return y_TD.view(x_BTD.shape), _routed_info(counts_E, ids_TK)


class _ChainStep(_Installed):
    """A whole model's decode step at batch 1 (embedding, every layer, final norm, output head) in one call."""

    def __init__(self, model: nn.Module, chain):
        self.model, self.chain = model, chain
        self.cached_layers = [layer.self_attn.layer for layer in model.layers]
        blocks = model.moe_blocks()
        self.moe = {i: (b.router.spec.top_k, b.cfg.num_experts) for i, b in blocks.items() if i < len(model.layers)}
        self.width = max((k for k, _ in self.moe.values()), default=1)

    def __call__(self, input_ids: torch.Tensor, cache, routing: bool = False):
        """(logits [1, 1, V], with routing each MoE layer's MoEInfo by index else None) of one decode step, or None
        where this step does not apply."""
        model = self.model
        if (
            input_ids.shape != (1, 1)
            or input_ids.dtype != torch.long
            or torch.is_grad_enabled()
            or cache.length == 0  # a prompt: the modules
            or cache.ragged
            or input_ids.device.type != "cpu"
            or not all(_inference(layer.mlp) for layer in model.layers)
            or not all(cache.has(i) for i in self.cached_layers)
        ):
            return None
        rooms = [cache.room(i, 1) for i in self.cached_layers]
        inv_freq, factor = model.rotary.frequencies(cache.length + 1)
        threads = torch.get_num_threads()
        routed_LK = torch.empty(len(self.cached_layers) if routing else 0, self.width, dtype=torch.long)
        logits = self.chain.step(input_ids, cache.length, inv_freq, factor, rooms, routed_LK, threads)
        cache.advance(1)
        if not routing:
            return logits, None
        infos = {}
        for i, (k, experts) in self.moe.items():
            ids_1K = routed_LK[i : i + 1, :k]
            infos[i] = _routed_info(torch.bincount(ids_1K[0], minlength=experts), ids_1K)
        return logits, infos


def _hyper_chain(model: nn.Module, steps: list):
    """The whole decode step of a model with hyper-connected streams (HyperDecodeChain) from each layer's steps
    (token-table layers' MoE blocks built here: their steps need the token), or None where a part is not covered."""
    ffn, tables = [], []
    for layer, (attention, step) in zip(model.layers, steps, strict=True):
        block, norm, table = layer.mlp, layer.post_attention_layernorm, _NO_LONGS
        decode = step.step if step is not None else None
        if decode is None and isinstance(block, MoEBlock) and isinstance(norm, RMSNorm) and _block_covered(block, True):
            decode = _ffn_decode(norm, block, block.shared_experts, block.shared_expert_gate, residual=False)
            table = block.router.table_VK
        if not isinstance(attention, _CompressedStep) or decode is None or 0 < len(table) < model.config.vocab_size:
            return None
        ffn.append(decode)
        tables.append(table)
    hyper = [t for layer in model.layers for hc in (layer.attn_hc, layer.ffn_hc) for t in (hc.fn, hc.base, hc.scale)]
    head_hyper = [model.hc_head.hc_fn, model.hc_head.hc_base, model.hc_head.hc_scale]
    head_parts = _linear_parts(model.lm_head)
    sliding = model.rotary_sliding or model.rotary
    embed = model.embed_tokens.weight
    if not isinstance(model.norm, RMSNorm) or head_parts is None:
        return None
    head_weight, head_quant = head_parts
    tensors = (embed, model.norm.weight, head_weight, model.rotary.inv_freq, sliding.inv_freq, *hyper, *head_hyper)
    kernel = _kernel(*(t for t in tensors if t.numel()))
    if kernel is None or model.rotary.longrope or sliding.longrope:
        return None
    first = model.layers[0].attn_hc
    return kernel.HyperDecodeChain(
        embed_weight=embed,
        attention=[a.step for a, _ in steps],
        ffn=ffn,
        hyper=hyper,
        tables=tables,
        sliding_rope=[
            layer.self_attn.layer_type == "sliding" and sliding is not model.rotary for layer in model.layers
        ],
        sliding_inv_freq=sliding.inv_freq,
        sliding_factor=sliding.attention_factor,
        sinkhorn_iters=first.iters,
        hyper_eps=first.eps,
        hyper_norm_eps=first.norm_eps,
        head_hyper=head_hyper,
        norm_weight=model.norm.weight,
        norm_eps=model.norm.eps,
        head_weight=head_weight,
        head_bias=_or_none(model.lm_head.bias),
        head_quant=head_quant,
    )


def _run_one_token(step, ffn: nn.Module, x_BTD: torch.Tensor):
    y_D, ids_K, counts_E = step(x_BTD.view(-1), torch.get_num_threads())
    info = _routed_info(counts_E, ids_K.view(1, -1)) if isinstance(ffn, MoEBlock) else None
    return y_D.view(1, 1, -1), info


def _routed_info(counts_E: torch.Tensor, ids_TK: torch.Tensor) -> MoEInfo:
    """A fused step's MoEInfo: dropless, no balancing loss (inference)."""
    return MoEInfo(counts_E, ids_TK.numel(), 0, counts_E.new_zeros((), dtype=torch.float32), ids_TK)


def _attention_covered(norm: nn.Module, attn: nn.Module) -> bool:
    """What the attention step computes: grouped-query attention behind an RMSNorm, QK-norm none / per head / over
    the projection, split-half rope or none, full or sliding-window layers, no NoPE temperature tuning or
    position-scaled queries, values as wide as keys and unscaled."""
    return (
        isinstance(attn, Attention)
        and isinstance(norm, RMSNorm)
        and _linears_covered(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        and attn.qk_norm in ("none", "head", "full")
        and attn.temperature is None
        and attn.query_scale is None
        and attn.v_dim == attn.head_dim
        and attn.value_scale == 1.0
        and not (attn.use_rope and attn.interleave)
        and attn.layer_type in ("full", "sliding")
    )


def _latent_step(norm: nn.Module, attn: LatentAttention) -> _AttentionStep | None:
    """MLA's decode step (MlaDecode: the latent cache read once, kv_b absorbed; DeepSeek Sparse Attention's indexer)
    for fp32 weights; layers sharing a DSA pick (GLM-5's shared indexer layers and the layer before them) are left
    to the modules."""
    q_lora, index = hasattr(attn, "q_a_proj"), attn.indexer
    linears = [attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj]
    linears += [attn.q_a_proj, attn.q_b_proj] if q_lora else [attn.q_proj]
    linears += [index.wq_b, index.wk, index.weights_proj] if index is not None else []
    shares = attn.sparse and (index is None or attn.pick_shared)
    if not isinstance(norm, RMSNorm) or shares or any(is_quantized(lin) for lin in linears):
        return None
    norms = [norm.weight, attn.kv_a_layernorm.weight] + ([attn.q_a_layernorm.weight] if q_lora else [])
    norms += [index.k_norm.weight, index.k_norm.bias] if index is not None else []
    kernel = _kernel(*(lin.weight for lin in linears), *norms)
    if kernel is None:
        return None
    beta, length = attn.query_scale or (0.0, 1)
    step = kernel.MlaDecode(
        norm_weight=norm.weight,
        norm_eps=norm.eps,
        q_a_weight=attn.q_a_proj.weight if q_lora else _NONE,
        q_a_bias=_or_none(attn.q_a_proj.bias) if q_lora else _NONE,
        q_norm_weight=attn.q_a_layernorm.weight if q_lora else _NONE,
        q_b_weight=(attn.q_b_proj if q_lora else attn.q_proj).weight,
        kv_a_weight=attn.kv_a_proj_with_mqa.weight,
        kv_a_bias=_or_none(attn.kv_a_proj_with_mqa.bias),
        kv_norm_weight=attn.kv_a_layernorm.weight,
        kv_b_weight=attn.kv_b_proj.weight,
        o_weight=attn.o_proj.weight,
        o_bias=_or_none(attn.o_proj.bias),
        heads=attn.num_heads,
        nope_dim=attn.nope_dim,
        rope_dim=attn.rope_dim,
        v_dim=attn.v_dim,
        latent_eps=attn.kv_a_layernorm.eps,
        scale=attn.scale,
        interleave=attn.interleave,
        query_beta=beta,
        query_length=length,
        index_q_weight=index.wq_b.weight if index is not None else _NONE,
        index_k_weight=index.wk.weight if index is not None else _NONE,
        index_norm_weight=index.k_norm.weight if index is not None else _NONE,
        index_norm_bias=index.k_norm.bias if index is not None else _NONE,
        index_weights_weight=index.weights_proj.weight if index is not None else _NONE,
        index_topk=index.topk if index is not None else 0,
        index_interleave=index.interleave if index is not None else False,
    )
    return _AttentionStep(attn, step, rows=True)


def attention_step(norm: nn.Module, attn: nn.Module, rotary: RotaryEmbedding | None = None):
    """The fused decode step of x + attn(norm(x)) (DeepSeek-V4's compressed attention: of attn(norm(x)), its
    entries rotated by `rotary`), or None where it does not cover the block."""
    if isinstance(attn, LatentAttention):
        return _latent_step(norm, attn)
    if isinstance(attn, CompressedAttention):
        return _compressed_step(norm, attn, rotary) if rotary is not None else None
    if not _attention_covered(norm, attn):
        return None
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    weights, quant = zip(*(_linear_parts(lin) for lin in linears), strict=True)
    kernel = _kernel(*(w for w in weights if w.numel()), norm.weight)
    if kernel is None:
        return None
    biases = [_or_none(lin.bias) for lin in linears]
    step = kernel.AttentionDecode(
        norm_weight=norm.weight,
        norm_eps=norm.eps,
        qkv_weights=weights[:3],
        qkv_biases=biases[:3],
        head_dim=attn.head_dim,
        q_norm_weight=_or_none(attn.q_norm.weight if attn.q_norm is not None else None),
        k_norm_weight=_or_none(attn.k_norm.weight if attn.k_norm is not None else None),
        full_qk_norm=attn.qk_norm == "full",
        qk_norm_eps=attn.norm_eps,
        clip_qkv=attn.clip_qkv or 0.0,
        window=attn.window or 0,
        scale=attn.scale,
        sinks=_or_none(attn.sinks),
        o_weight=weights[3],
        o_bias=biases[3],
        qkv_quant=list(quant[:3]),
        o_quant=quant[3],
    )
    return _AttentionStep(attn, step, rows=not any(quant))


class _CompressedStep(_Installed):
    """attn(norm(x)) for one token (x [1, 1, D]) of DeepSeek-V4's attention with an unpadded cache, or None where
    this step does not apply."""

    def __init__(self, attn: CompressedAttention, step, rotary: RotaryEmbedding):
        self.attn, self.step, self.rotary = attn, step, rotary

    def __call__(self, x_BTD: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor | None:
        cache, attn = inputs.cache, self.attn
        if cache is None or torch.is_grad_enabled() or not cache.has(attn.layer) or not _one_token_fp32(x_BTD):
            return None
        if inputs.masks["full"] is not None or cache.ragged:  # padding: key slots are not positions
            return None
        cos, sin = (r.view(-1) for r in inputs.rope_of(attn.layer_type))
        inv_freq, factor = self.rotary.frequencies(cache.length + 1)
        rooms = cache.room(attn.layer, 1)
        y_D = self.step(x_BTD.view(-1), cos, sin, inv_freq, factor, rooms, cache.length, torch.get_num_threads())
        return y_D.view(1, 1, -1)


def _compressed_step(norm: nn.Module, attn: CompressedAttention, rotary: RotaryEmbedding) -> _CompressedStep | None:
    """DeepSeek-V4's attention step (CompressedDecode) for fp32 weights."""
    pools = [c for c in (attn.compressor, attn.indexer and attn.indexer.compressor) if c is not None]
    index = attn.indexer
    linears = [attn.q_a_proj, attn.q_b_proj, attn.kv_proj, attn.o_a_proj, attn.o_b_proj]
    linears += [lin for c in pools for lin in (c.kv_proj, c.gate_proj)]
    linears += [index.q_b_proj, index.weights_proj] if index is not None else []
    if not isinstance(norm, RMSNorm) or any(is_quantized(lin) for lin in linears):
        return None
    parts = [[c.kv_proj.weight, c.gate_proj.weight, c.position_bias, c.kv_norm.weight] for c in pools]
    norms = [norm.weight, attn.q_a_norm.weight, attn.kv_norm.weight, attn.sinks, rotary.inv_freq]
    kernel = _kernel(*(lin.weight for lin in linears), *norms, *(t for p in parts for t in p))
    if kernel is None:
        return None
    compressor = attn.compressor
    step = kernel.CompressedDecode(
        norm_weight=norm.weight,
        norm_eps=norm.eps,
        q_a_weight=attn.q_a_proj.weight,
        q_norm_weight=attn.q_a_norm.weight,
        q_b_weight=attn.q_b_proj.weight,
        kv_weight=attn.kv_proj.weight,
        kv_norm_weight=attn.kv_norm.weight,
        o_a_weight=attn.o_a_proj.weight,
        o_b_weight=attn.o_b_proj.weight,
        sinks=attn.sinks,
        heads=attn.num_heads,
        head_dim=attn.head_dim,
        groups=attn.o_groups,
        block_eps=attn.norm_eps,
        window=attn.window,
        scale=attn.head_dim**-0.5,
        compressor=parts[0] if parts else [],
        rate=compressor.rate if compressor is not None else 1,
        overlap=compressor.overlap if compressor is not None else False,
        indexer=[*parts[1], index.q_b_proj.weight, index.weights_proj.weight] if index is not None else [],
        index_heads=index.heads if index is not None else 0,
        index_dim=index.dim if index is not None else 0,
        index_topk=index.topk if index is not None else 0,
    )
    return _CompressedStep(attn, step, rotary)


def _block_covered(block: MoEBlock, table: bool = False) -> bool:
    """What the FFN step computes of an MoE block: token choice by softmax, sigmoid or sqrt-softplus scores (softmax
    before or after top-k), selection bias, group-limited, renormalisation by the sum, scaling, weights on the input
    or output, dropless; table: the experts picked by a token table instead (the chain's, which has the token)."""
    spec = block.router.spec
    experts = block.experts
    stacks = _expert_stacks(experts)  # routed experts the kernels read: one stack, or one per format
    if stacks and not all(covers(s, b) and s.int8_activations for s in stacks for b in ("gate_up_proj", "down_proj")):
        return False
    shared = block.shared_experts
    return (
        type(block.dispatcher) is LocalDispatcher  # expert parallel: the experts are elsewhere
        and type(block.router) is (TokenTableRouter if table else TokenChoiceRouter)
        and (shared is None or _linears_covered(shared.gate_proj, shared.up_proj, shared.down_proj))
        and spec.score_func in KERNEL_SCORES
        and spec.normalize_p == 1.0
        and block.router.cfg.capacity_factor is None
        and not (block.shared_experts is not None and block.experts.layout.bias)
    )


def _expert_stacks(experts: nn.Module) -> list[QuantizedExperts]:
    """The quantized stacks of a layer's routed experts (one per format for MixedExperts); [] where they are float."""
    if isinstance(experts, MixedExperts):
        return list(experts.groups)
    return [experts] if isinstance(experts, QuantizedExperts) else []


_NO_LONGS = torch.empty(0, dtype=torch.long)  # no expert places (the experts are their stack's slots), no table


def ffn_step(norm: nn.Module, ffn: nn.Module, residual: bool = True) -> _FfnStep | None:
    """The fused decode step of x + ffn(norm(x)) (or ffn(norm(x)) alone: no residual), ffn an MoE block or a dense
    FFN (as the shared-expert part alone); None where it does not cover the block."""
    if not isinstance(norm, RMSNorm):
        return None
    if isinstance(ffn, FeedForward):
        if not _linears_covered(ffn.gate_proj, ffn.up_proj, ffn.down_proj):
            return None
        step = None if ffn.layout.bias else _ffn_decode(norm, None, ffn, None, residual)
    else:
        covered = _block_covered(ffn)
        step = _ffn_decode(norm, ffn, ffn.shared_experts, ffn.shared_expert_gate, residual) if covered else None
    return _FfnStep(ffn, step, rows=not is_quantized(ffn)) if step is not None else None  # rows: fp32 only


def block_step(block: MoEBlock) -> _BlockStep | None:
    """The fused step of an MoE block alone (no norm or residual) over any batch of tokens, or None where it does
    not cover the block (quantized experts: decode only)."""
    shared = block.shared_experts
    if not _block_covered(block) or is_quantized(block.experts) or (shared is not None and is_quantized(shared)):
        return None
    step = _ffn_decode(None, block, block.shared_experts, block.shared_expert_gate)
    return _BlockStep(block, step) if step is not None else None


def _ffn_decode(
    norm: RMSNorm | None,
    block: MoEBlock | None,
    dense: FeedForward | None,
    dense_gate: nn.Linear | None,
    residual: bool = True,
):
    layout = (block.experts if block is not None else dense).layout
    parts = [
        _linear_parts(getattr(dense, n) if dense is not None else None) for n in ("gate_proj", "up_proj", "down_proj")
    ]
    shared = {
        "shared_gate_weight": parts[0][0],
        "shared_up_weight": parts[1][0],
        "shared_down_weight": parts[2][0],
        "shared_sigmoid_weight": _or_none(dense_gate.weight if dense_gate is not None else None),
    }
    shared_quant = [q for _, q in parts]
    routing: dict = {
        "router_weight": _NONE,
        "router_bias": _NONE,
        "selection_bias": _NONE,
        "score_function": 0,
        "softmax_after_topk": False,
        "top_k": 0,
        "normalize": False,
        "normalize_eps": 0.0,
        "scaling_factor": 1.0,
        "apply_to_input": False,
        "n_group": 1,
        "topk_group": 1,
        "group_top2": False,
        "gate_up_weight": _NONE,
        "down_weight": _NONE,
        "gate_up_bias": _NONE,
        "down_bias": _NONE,
    }
    quant: dict = {"gate_up_quant": [], "down_quant": [], "expert_place": _NO_LONGS}
    if block is not None:
        spec, experts, router = block.router.spec, block.experts, block.router
        stacks = _expert_stacks(experts)
        quantized = bool(stacks)
        if quantized:
            for b in ("gate_up_proj", "down_proj"):
                quant[b.removesuffix("_proj") + "_quant"] = [quant_weights(s, b) for s in stacks]
            if any(q is None for b in ("gate_up_quant", "down_quant") for q in quant[b]):
                return None
            if isinstance(experts, MixedExperts):
                quant["expert_place"] = torch.tensor(experts.place_E, dtype=torch.long)
        routing.update(
            router_weight=router.weight,
            router_bias=_or_none(router.bias),
            selection_bias=_or_none(router.selection_bias_E),
            score_function=KERNEL_SCORES.index(spec.score_func),
            softmax_after_topk=spec.softmax_after_topk,
            top_k=spec.top_k,
            normalize=spec.normalize,
            normalize_eps=spec.normalize_eps,
            scaling_factor=spec.scaling_factor,
            apply_to_input=spec.apply_to == "input",
            n_group=spec.n_group,
            topk_group=spec.topk_group,
            group_top2=spec.group_score == "top2_sum",
            gate_up_weight=_NONE if quantized else experts.gate_up_proj,
            down_weight=_NONE if quantized else experts.down_proj,
            gate_up_bias=experts.gate_up_proj_bias if layout.bias else _NONE,
            down_bias=experts.down_proj_bias if layout.bias else _NONE,
        )
    norm_args = {"norm_weight": _NONE, "norm_eps": 0.0, "residual": False}
    if norm is not None:  # with a norm: the residual too, unless a hyper-connection mixes the output instead
        norm_args = {"norm_weight": norm.weight, "norm_eps": norm.eps, "residual": residual}
    tensors = [t for t in (*norm_args.values(), *routing.values(), *shared.values()) if isinstance(t, torch.Tensor)]
    kernel = _kernel(*(t for t in tensors if t.numel()))
    if kernel is None:
        return None
    return kernel.FfnDecode(
        **norm_args,
        **routing,
        transposed=layout.transposed,
        gated=layout.gated,
        interleaved=layout.gate_up == "interleaved",
        activation=ACTIVATIONS.index(layout.activation),
        swiglu_alpha=layout.swiglu_alpha,
        swiglu_limit=layout.swiglu_limit,
        **shared,
        **quant,
        shared_quant=shared_quant,
    )


def _chain(model: nn.Module, steps: list[tuple[_AttentionStep | None, _FfnStep | None]]):
    """The model's whole decode step (DecodeChain) from each layer's (attention, FFN) steps, or None where a part is
    not covered."""
    if any(a is None or f is None for a, f in steps) or model.rotary_sliding is not None:  # one rope in the chain
        return None
    head, embed = model.lm_head, model.embed_tokens.weight
    head_parts = _linear_parts(head)
    if not isinstance(model.norm, RMSNorm) or head_parts is None:
        return None
    head_weight, head_quant = head_parts
    kernel = _kernel(*(t for t in (embed, model.norm.weight, head_weight, model.rotary.inv_freq) if t.numel()))
    if kernel is None:
        return None
    return kernel.DecodeChain(
        embed_weight=embed,
        attention=[a.step for a, _ in steps],
        ffn=[f.step for _, f in steps],
        rope_layers=[layer.self_attn.use_rope for layer in model.layers],
        norm_weight=model.norm.weight,
        norm_eps=model.norm.eps,
        head_weight=head_weight,
        head_bias=_or_none(head.bias),
        head_quant=head_quant,
    )
