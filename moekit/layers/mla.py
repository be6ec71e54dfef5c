"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one compressed latent per token
(kv_lora_rank wide) plus one rotary key shared by all heads, so that pair is all a KV cache needs to hold. With
DeepSeek Sparse Attention (index_topk > 0) each query attends only to the keys its layer's indexer picks (or the
previous indexer layer's pick, on GLM-5's shared layers); the indexer's keys join the cache."""

from __future__ import annotations

import torch
from torch import nn

from moekit.config.model import ModelConfig
from moekit.layers.attention import AttentionInputs, attend, causal_mask, position_query_scale
from moekit.layers.dsa import Indexer
from moekit.layers.linear import Linear
from moekit.layers.norm import RMSNorm
from moekit.layers.rope import apply_rope, softmax_scale

# The latent and low-rank query norms' epsilon, whatever the model's (DeepSeek's reference code and transformers
# build them with the default; Kimi K2 and GLM-5 set rms_norm_eps 1e-5 for the others)
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    use_rope = True  # every layer rotates its rope part (the fused steps ask)

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        a, d, h = cfg.attention, cfg.hidden_size, cfg.num_heads
        self.num_heads, self.layer_type, self.interleave = h, a.layer_type(layer), a.rope_interleave
        self.layer = layer
        self.nope_dim, self.rope_dim, self.v_dim, self.kv_rank = (
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
            a.kv_lora_rank,
        )
        qk_dim = self.nope_dim + self.rope_dim
        if a.q_lora_rank is None:
            self.q_proj = Linear(d, h * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(d, a.q_lora_rank, bias=a.qkv_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(a.q_lora_rank, h * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.kv_rank + self.rope_dim, bias=a.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(h * self.v_dim, d, bias=a.out_bias)
        self.scale = softmax_scale(qk_dim, cfg.rope_scaling)
        self.query_scale = (a.query_scale_beta, a.query_scale_length) if a.query_scale_beta else None
        self.sparse = a.index_topk > 0
        self.indexer = Indexer(cfg) if self.sparse and layer not in a.index_shared_layers else None
        self.pick_shared = layer + 1 in a.index_shared_layers  # the next layer reuses this layer's pick

    def queries(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the heads' queries [B, T, H * qk], the low-rank query [B, T, q_lora_rank] or None)."""
        if hasattr(self, "q_proj"):
            return self.q_proj(x_BTD), None
        q_low_BTQ = self.q_a_layernorm(self.q_a_proj(x_BTD))
        return self.q_b_proj(q_low_BTQ), q_low_BTQ

    def latents(self, x_BTD: torch.Tensor, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache holds per token: the normalised latent [B, T, kv_rank] and the rotated key [B, T, rope]."""
        latent_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_rank, self.rope_dim], dim=-1)
        k_rope_BTR = apply_rope(k_rope_BTR.unsqueeze(1), *inputs.rope, self.interleave).squeeze(1)
        return self.kv_a_layernorm(latent_BTC), k_rope_BTR

    def forward(self, x_BTD: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        q, q_low_BTQ = self.queries(x_BTD)
        q = q.view(b, t, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q = torch.cat((q_nope, apply_rope(q_rope, *inputs.rope, self.interleave)), dim=-1)
        if self.query_scale is not None:
            q = q * position_query_scale(inputs.query_index_BT, *self.query_scale).to(q.dtype)
        cached = self.latents(x_BTD, inputs)
        if self.indexer is not None:
            cached = (*cached, self.indexer.keys(x_BTD, inputs.rope))
        if inputs.cache is not None:  # the cache holds latents: keys and values are re-expanded from them
            cached = inputs.cache.extend(self.layer, (1,) * len(cached), *cached)
        latent_BTC, k_rope_BTR = cached[:2]
        s = latent_BTC.shape[1]
        mask = inputs.masks[self.layer_type]
        if self.sparse:
            mask = self._sparse_mask(x_BTD, q_low_BTQ, cached, inputs, mask)
        kv = self.kv_b_proj(latent_BTC).view(b, s, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope_BTR.unsqueeze(1).expand(b, self.num_heads, s, self.rope_dim)), dim=-1)
        out = attend(q, k, v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _sparse_mask(self, x_BTD, q_low_BTQ, cached, inputs: AttentionInputs, mask):
        """The mask restricted to the keys the indexer picks (this layer's, or the last indexer layer's, kept in
        inputs.sparse_pick for the layers that share it); the mask itself while every key fits in index_topk."""
        t, s = x_BTD.shape[1], cached[0].shape[1]
        picks = self.indexer is not None and s > self.indexer.topk
        if self.indexer is not None and not picks:
            inputs.sparse_pick = None  # every key fits in index_topk: all are kept
        if not picks and inputs.sparse_pick is None:
            return mask
        mask = mask if mask is not None else causal_mask(None, t, s, x_BTD.device)
        if picks:
            inputs.sparse_pick = self.indexer.select(x_BTD, q_low_BTQ, cached[2], inputs.rope, mask[:, 0])
        return mask & inputs.sparse_pick[:, None]
