"""Grouped-query attention with the published variants: qkv/output bias, QK-norm (per head, full projection, or
weightless L2), clip_qkv, attention sinks, sliding-window and chunked layers, NoPE layers with temperature tuning."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config.model import ModelConfig
from moekit.infer.cache import KVCache
from moekit.layers.linear import Linear, project
from moekit.layers.norm import OffsetRMSNorm, RMSNorm
from moekit.layers.rope import apply_rope


def mask_positions(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Each slot's position in its row [B, S], counting real tokens only (padding takes its neighbour's)."""
    return (attention_mask_BS.long().cumsum(-1) - 1).clamp_min(0)


def causal_mask(
    attention_mask_BT: torch.Tensor | None,
    num_queries: int,
    num_keys: int,
    device,
    window: int | None = None,
    chunk: int | None = None,
    query_keys_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B or 1, 1, T, S] mask (T queries, S keys), True where a query may attend; the queries are the last T
    positions, or where query_keys_BT puts them in each row (rows of a ragged cache: keys past a row's query are
    another row's room and stay masked). window: only the last `window` keys (the query's own included); chunk:
    only keys in the query's chunk. Padded queries keep their own position open so softmax never sees an
    all-masked row."""
    if query_keys_BT is None:
        query_keys_BT = torch.arange(num_keys - num_queries, num_keys, device=device)[None]
    q_pos = query_keys_BT[:, :, None]
    k_pos = torch.arange(num_keys, device=device)[None, None, :]
    allowed_TS = k_pos <= q_pos
    if window is not None:
        allowed_TS = allowed_TS & (k_pos > q_pos - window)
    if chunk is not None:
        if attention_mask_BT is not None:  # positions skip the padding
            k_pos = mask_positions(attention_mask_BT)
            q_pos = k_pos.gather(1, query_keys_BT.expand(k_pos.shape[0], -1))[:, :, None]
            k_pos = k_pos[:, None, :]
        allowed_TS = allowed_TS & (k_pos // chunk == q_pos // chunk)
    if attention_mask_BT is None:
        return allowed_TS[:, None]
    keys_B1S = attention_mask_BT.bool()[:, None, :]
    allowed_BTS = allowed_TS & keys_B1S
    allowed_BTS = allowed_BTS | torch.eye(num_keys, device=device, dtype=torch.bool)[-num_queries:][None]
    return allowed_BTS[:, None]


def position_query_scale(query_index_BT: torch.Tensor, beta: float, length: int) -> torch.Tensor:
    """[B or 1, 1, T, 1] factors 1 + beta·log(1 + floor(pos / length)) of each query (Mistral Small 4)."""
    pos_B1T1 = query_index_BT.float()[:, None, :, None]
    return 1.0 + beta * torch.log1p(torch.floor(pos_B1T1 / length))


@dataclass
class AttentionInputs:
    """What every attention layer of one forward pass shares: rotary cos/sin [B, T, rope_dim], the mask of each
    layer type (see causal_mask; None: plain causal, the queries being the last of the keys), the position of each
    query in its sequence [B or 1, T] (NoPE temperature tuning; padding not counted), and the KV cache when
    generating (None otherwise)."""

    rope: tuple[torch.Tensor, torch.Tensor]
    masks: dict[str, torch.Tensor | None]
    query_index_BT: torch.Tensor
    cache: KVCache | None = None
    sliding_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # sliding layers' own theta (MiMo-V2-Flash)
    sparse_pick: torch.Tensor | None = None  # the last DSA indexer's pick [B, T, S], for the layers sharing it
    # DeepSeek-V4's compressors: each key slot's position in its row [B or 1, S] (-1: padding, or past the row's
    # tokens), and the rotary cos/sin at any positions [1, W]
    key_positions_BS: torch.Tensor | None = None
    rope_at: Callable | None = None
    token_mask_BT: torch.Tensor | None = None  # the pass's real tokens where padded (linear attention zeroes padding)

    def rope_of(self, layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos/sin a layer of this type uses."""
        return self.sliding_rope if layer_type == "sliding" and self.sliding_rope is not None else self.rope


def attend(
    q_BHTd: torch.Tensor,
    k_BHSd: torch.Tensor,
    v_BHSd: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    sinks_H: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention over keys S, with GQA head sharing; mask None: plain causal, the queries being
    the last T of the S keys. sinks_H adds one logit per head to the softmax denominator (GPT-OSS), done as an extra
    key of zero key and value whose additive bias is the sink."""
    h, kv_h = q_BHTd.shape[1], k_BHSd.shape[1]
    t, s = q_BHTd.shape[2], k_BHSd.shape[2]
    if mask is None and sinks_H is None and t in (1, s):
        # SDPA's own paths, no mask to build and read: causal over T = S, or one query that sees every key (decode)
        return F.scaled_dot_product_attention(
            q_BHTd, k_BHSd, v_BHSd, is_causal=t > 1, scale=scale, enable_gqa=h != kv_h
        )
    if mask is None:
        mask = causal_mask(None, t, s, q_BHTd.device)
    if sinks_H is not None:
        k_BHSd = torch.cat((k_BHSd, k_BHSd.new_zeros(k_BHSd.shape[0], kv_h, 1, k_BHSd.shape[-1])), dim=2)
        v_BHSd = torch.cat((v_BHSd, v_BHSd.new_zeros(v_BHSd.shape[0], kv_h, 1, v_BHSd.shape[-1])), dim=2)
        bias = torch.zeros(mask.shape, dtype=q_BHTd.dtype, device=q_BHTd.device).masked_fill(~mask, float("-inf"))
        sink = sinks_H.to(q_BHTd.dtype).view(1, h, 1, 1).expand(bias.shape[0], h, t, 1)
        mask = torch.cat((bias.expand(bias.shape[0], h, t, bias.shape[-1]), sink), dim=-1)
    return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, attn_mask=mask, scale=scale, enable_gqa=h != kv_h)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        a, d, hd = cfg.attention, cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads(layer), hd
        self.v_dim, self.value_scale = cfg.value_dim, a.value_scale
        self.layer, self.layer_type, self.use_rope = layer, a.layer_type(layer), layer not in a.nope_layers
        self.qk_norm, self.clip_qkv, self.interleave = a.qk_norm, a.clip_qkv, a.rope_interleave
        self.temperature = (a.attn_scale, a.floor_scale) if a.temperature_tuning and not self.use_rope else None
        self.query_scale = (a.query_scale_beta, a.query_scale_length) if a.query_scale_beta else None
        self.norm_eps = cfg.norm_eps
        kv_heads = self.num_kv_heads
        self.output_gate = a.output_gate
        self.q_proj = Linear(d, cfg.num_heads * hd * (2 if a.output_gate else 1), bias=a.qkv_bias)
        self.k_proj = Linear(d, kv_heads * hd, bias=a.qkv_bias)
        self.v_proj = Linear(d, kv_heads * self.v_dim, bias=a.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * self.v_dim, d, bias=a.out_bias)
        widths = {"head": (hd, hd), "head_after_rope": (hd, hd), "full": (cfg.num_heads * hd, kv_heads * hd)}
        norm_width = widths.get(a.qk_norm)
        norm = OffsetRMSNorm if cfg.norm == "rms_offset" else RMSNorm  # the q/k norms follow the model's
        self.q_norm = norm(norm_width[0], cfg.norm_eps) if norm_width else None
        self.k_norm = norm(norm_width[1], cfg.norm_eps) if norm_width else None
        self.sinks = nn.Parameter(torch.zeros(cfg.num_heads)) if a.has_sinks(layer) else None
        self.scale = a.softmax_scale if a.softmax_scale is not None else hd**-0.5
        self.window = a.sliding_window if self.layer_type == "sliding" else None

    def forward(self, x_BTD: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        q, k, v = project((self.q_proj, self.k_proj, self.v_proj), x_BTD)
        gate = None
        if self.output_gate:  # per head: [query, gate], each head_dim wide
            q, gate = q.view(b, t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
            q, gate = q.reshape(b, t, -1), gate.reshape(b, t, -1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.v_dim)
        if self.value_scale != 1.0:
            v = v * self.value_scale
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if self.use_rope:
            rope = inputs.rope_of(self.layer_type)
            q, k = self._rope(q, rope), self._rope(k, rope)
            if self.qk_norm == "l2":
                q, k = _l2_norm(q, self.norm_eps), _l2_norm(k, self.norm_eps)
        if self.qk_norm == "head_after_rope":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.temperature is not None:
            attn_scale, floor_scale = self.temperature
            pos_B1T1 = inputs.query_index_BT.float()[:, None, :, None]
            q = q * (torch.log1p(torch.floor((pos_B1T1 + 1.0) / floor_scale)) * attn_scale + 1.0)
        if self.query_scale is not None:
            q = q * position_query_scale(inputs.query_index_BT, *self.query_scale).to(q.dtype)
        if inputs.cache is not None:
            k, v = inputs.cache.extend(self.layer, (2, 2), k, v)
        out = attend(q, k, v, inputs.masks[self.layer_type], self.scale, self.sinks)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out if gate is None else out * torch.sigmoid(gate))

    def _rope(self, x_BHTd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        r = rope[0].shape[-1]
        if r == self.head_dim:
            return apply_rope(x_BHTd, *rope, self.interleave)
        return torch.cat((apply_rope(x_BHTd[..., :r], *rope, self.interleave), x_BHTd[..., r:]), dim=-1)


def _l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
