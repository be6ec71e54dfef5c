"""Grouped-query attention with RoPE, optional QK-norm and qkv bias; causal, with a padding mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config.model import ModelConfig
from moekit.layers.norm import RMSNorm
from moekit.layers.rope import apply_rope


def causal_mask(attention_mask_BT: torch.Tensor | None, num_queries: int, num_keys: int, device) -> torch.Tensor:
    """Boolean [B or 1, 1, Tq, Tk] mask, True where a query may attend; the queries are the last Tq positions.
    Padded queries keep their own position open so softmax never sees an all-masked row."""
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device).unsqueeze(1)
    allowed_QK = torch.arange(num_keys, device=device).unsqueeze(0) <= q_pos
    if attention_mask_BT is None:
        return allowed_QK[None, None]
    keys_B1K = attention_mask_BT.bool()[:, None, :]
    allowed_BQK = allowed_QK[None] & keys_B1K
    allowed_BQK = allowed_BQK | torch.eye(num_keys, device=device, dtype=torch.bool)[-num_queries:][None]
    return allowed_BQK[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_BTD).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BTD).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
