"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one compressed latent per token
(kv_lora_rank wide) plus one rotary key shared by all heads, so that pair is all a KV cache needs to hold."""

from __future__ import annotations

import torch
from torch import nn

from moekit.config.model import ModelConfig
from moekit.layers.attention import AttentionInputs, attend, position_query_scale
from moekit.layers.linear import Linear
from moekit.layers.norm import RMSNorm
from moekit.layers.rope import apply_rope, softmax_scale


class LatentAttention(nn.Module):
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
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = Linear(a.q_lora_rank, h * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.kv_rank + self.rope_dim, bias=a.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.kv_b_proj = Linear(self.kv_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(h * self.v_dim, d, bias=a.out_bias)
        self.scale = softmax_scale(qk_dim, cfg.rope_scaling)
        self.query_scale = (a.query_scale_beta, a.query_scale_length) if a.query_scale_beta else None

    def queries(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x_BTD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))

    def latents(self, x_BTD: torch.Tensor, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache holds per token: the normalised latent [B, T, kv_rank] and the rotated key [B, T, rope]."""
        latent_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_rank, self.rope_dim], dim=-1)
        k_rope_BTR = apply_rope(k_rope_BTR.unsqueeze(1), *inputs.rope, self.interleave).squeeze(1)
        return self.kv_a_layernorm(latent_BTC), k_rope_BTR

    def forward(self, x_BTD: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        q = self.queries(x_BTD).view(b, t, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q = torch.cat((q_nope, apply_rope(q_rope, *inputs.rope, self.interleave)), dim=-1)
        if self.query_scale is not None:
            q = q * position_query_scale(inputs.query_index_BT, *self.query_scale).to(q.dtype)
        latent_BTC, k_rope_BTR = self.latents(x_BTD, inputs)
        if inputs.cache is not None:  # the cache holds latents: keys and values are re-expanded from them
            latent_BTC, k_rope_BTR = inputs.cache.extend(self.layer, (1, 1), latent_BTC, k_rope_BTR)
        s = latent_BTC.shape[1]
        kv = self.kv_b_proj(latent_BTC).view(b, s, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope_BTR.unsqueeze(1).expand(b, self.num_heads, s, self.rope_dim)), dim=-1)
        out = attend(q, k, v, inputs.masks[self.layer_type], self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
