"""DeepSeek-V4's attention: one shared key/value head (K = V) over a sliding window, with sinks, beside compressed
entries of the whole past: every `compress_rate` tokens of a compressed layer (CSA) become one entry, of which the
lightning indexer keeps index_topk per query; every `heavy_compress_rate` tokens of a heavily compressed layer (HCA)
become one entry, all of them kept. An entry is a softmax-gated (per channel, with a learned bias per slot) sum of
its window's projections, RMS-normed and rotated at the window's first position; CSA's windows overlap (entry w
also mixes window w - 1's first half of the channels). Rope rotates the last rope dims of each head in adjacent
pairs kept in place, and is undone on the output at the query's position; the output projection is grouped.

The cache keeps per token the window keys and the compressors' inputs (projections and gates), and each entry at the
slot of its window's last token. The modules recompute each row's entries from its own tokens (so padding and rows
at different positions never shift a window) and store them; the fused decode step (moekit.infer.fast) computes
only the entry its token completes and reads the stored ones."""

from __future__ import annotations

import torch
from torch import nn

from moekit.config.model import ModelConfig
from moekit.kernels.products import gather_gemv
from moekit.layers.attention import AttentionInputs, attend
from moekit.layers.dsa import pick_top
from moekit.layers.linear import Linear, float_weight, project
from moekit.layers.norm import RMSNorm, unweighted_rms_norm


def rope_tail(x: torch.Tensor, cos_BTr: torch.Tensor, sin_BTr: torch.Tensor) -> torch.Tensor:
    """Rotate the last r dims of x [B, (H,) T, d] in adjacent pairs kept in place (cos, sin [B, T, r] as
    RotaryEmbedding gives them: each frequency twice, halves)."""
    r = cos_BTr.shape[-1]
    cos, sin = cos_BTr[..., : r // 2].float(), sin_BTr[..., : r // 2].float()
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    tail = x[..., -r:].float()
    even, odd = tail[..., 0::2], tail[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((x[..., :-r], rotated.to(x.dtype)), dim=-1)


class Compressor(nn.Module):
    """kv_proj and gate_proj [(2 if overlap) * dim, D], position_bias [rate, (2 if overlap) * dim], kv_norm."""

    def __init__(self, cfg: ModelConfig, rate: int, dim: int, overlap: bool):
        super().__init__()
        self.rate, self.dim, self.overlap = rate, dim, overlap
        width = (2 if overlap else 1) * dim
        self.kv_proj = Linear(cfg.hidden_size, width, bias=False)
        self.gate_proj = Linear(cfg.hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, width))
        self.kv_norm = RMSNorm(dim, cfg.norm_eps)

    def entries(self, kv_SX: torch.Tensor, gate_SX: torch.Tensor, rope_at) -> torch.Tensor:
        """The entries [W, dim] of one sequence's tokens' projections [S, X] (complete windows only), rotated at
        their windows' first positions by rope_at(positions [1, W]) -> (cos, sin)."""
        w, rate, d = kv_SX.shape[0] // self.rate, self.rate, self.dim
        if w == 0:
            return kv_SX.new_zeros(0, d)
        kv = kv_SX[: w * rate].view(w, rate, -1)
        gate = gate_SX[: w * rate].view(w, rate, -1).float() + self.position_bias.float()
        if self.overlap:  # window w's slots: window w - 1's first channels (Ca), then its own last ones (Cb)
            prev_kv, prev_gate = kv.new_zeros(w, rate, d), gate.new_full((w, rate, d), float("-inf"))
            prev_kv[1:], prev_gate[1:] = kv[:-1, :, :d], gate[:-1, :, :d]
            kv, gate = torch.cat((prev_kv, kv[..., d:]), dim=1), torch.cat((prev_gate, gate[..., d:]), dim=1)
        pooled = (kv * gate.softmax(dim=1).to(kv.dtype)).sum(dim=1)
        cos, sin = rope_at(torch.arange(w, device=kv.device)[None] * rate)
        return rope_tail(self.kv_norm(pooled)[None], cos, sin)[0]


class CompressedIndexer(nn.Module):
    """CSA's lightning indexer: its own overlapping compressor at index_head_dim, q_b_proj from the low-rank query,
    weights_proj; scores sum_h w_h relu(q_h . k_s)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.attention
        self.heads, self.dim, self.topk = a.index_heads, a.index_head_dim, a.index_topk
        self.compressor = Compressor(cfg, a.compress_rate, a.index_head_dim, overlap=True)
        self.q_b_proj = Linear(a.q_lora_rank, self.heads * self.dim, bias=False)
        self.weights_proj = Linear(cfg.hidden_size, self.heads, bias=False)

    def pick(self, q_BTX, weights_BTH, entries_BWd, rope, visible_BTW) -> torch.Tensor:
        """Boolean [B, T, W]: the index_topk visible entries of each query, from its q_b_proj and weights_proj
        projections."""
        b, t, _ = q_BTX.shape
        q = rope_tail(q_BTX.view(b, t, self.heads, self.dim).transpose(1, 2), *rope)
        return pick_top(q, entries_BWd, weights_BTH, visible_BTW, self.topk)


class CompressedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        a, d, h, hd = cfg.attention, cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.layer, self.layer_type, self.num_heads, self.head_dim = layer, a.layer_type(layer), h, hd
        self.norm_eps, self.o_groups, self.window = cfg.norm_eps, a.o_groups, a.sliding_window
        self.q_a_proj = Linear(d, a.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(a.q_lora_rank, cfg.norm_eps)
        self.q_b_proj = Linear(a.q_lora_rank, h * hd, bias=False)
        self.kv_proj = Linear(d, hd, bias=False)
        self.kv_norm = RMSNorm(hd, cfg.norm_eps)
        self.o_a_proj = Linear(h * hd // a.o_groups, a.o_groups * a.o_lora_rank, bias=False)  # per group: a block
        self.o_b_proj = Linear(a.o_groups * a.o_lora_rank, d, bias=False)
        self.sinks = nn.Parameter(torch.zeros(h))
        self.compressor, self.indexer = None, None
        if self.layer_type == "compressed":
            self.compressor = Compressor(cfg, a.compress_rate, hd, overlap=True)
            self.indexer = CompressedIndexer(cfg)
        elif self.layer_type == "heavily_compressed":
            self.compressor = Compressor(cfg, a.heavy_compress_rate, hd, overlap=False)

    def forward(self, x_BTD: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        rope = inputs.rope_of(self.layer_type)
        index = self.indexer
        # the projections of the input, then those of the low-rank query: each group in one pass at decode
        parts = [c for c in (self.compressor, index and index.compressor) if c is not None]
        of_x = [self.q_a_proj, self.kv_proj, *(lin for c in parts for lin in (c.kv_proj, c.gate_proj))]
        of_x += [index.weights_proj] if index is not None else []
        projected = list(project(tuple(of_x), x_BTD))
        q_low_BTQ = self.q_a_norm(projected[0])
        q_BTX, *index_q = project((self.q_b_proj, *([index.q_b_proj] if index is not None else [])), q_low_BTQ)
        q = q_BTX.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        q = rope_tail(unweighted_rms_norm(q, self.norm_eps), *rope)
        cached = [rope_tail(self.kv_norm(projected[1]), *rope), *projected[2 : 2 + 2 * len(parts)]]
        stored = []  # each compressor's entries at their windows' last slots, in the cache
        if inputs.cache is not None:
            entry_slots = [x_BTD.new_zeros(b, t, c.dim) for c in parts]  # written below
            cached = list(inputs.cache.extend(self.layer, (1,) * (len(cached) + len(parts)), *cached, *entry_slots))
            cached, stored = cached[: -len(parts) or None], cached[len(cached) - len(parts) :]
        kv_BSd, s = cached[0], cached[0].shape[1]
        mask = inputs.masks["sliding"].expand(b, 1, t, s)
        keys = kv_BSd.unsqueeze(1)
        if self.compressor is not None:
            entries_BWd, visible_BTW = self._entries(self.compressor, cached[1], cached[2], inputs, s, stored[:1])
            if self.indexer is not None:
                index_BWd, _ = self._entries(self.indexer.compressor, cached[3], cached[4], inputs, s, stored[1:])
                visible_BTW = index.pick(index_q[0], projected[-1], index_BWd, inputs.rope, visible_BTW)
            keys = torch.cat((keys, entries_BWd.unsqueeze(1)), dim=2)
            mask = torch.cat((mask, visible_BTW.unsqueeze(1)), dim=-1)
        out = attend(q, keys, keys, mask, self.head_dim**-0.5, self.sinks)
        cos, sin = rope
        out = rope_tail(out, cos, -sin).transpose(1, 2)  # the values' rotation undone at the query's position
        grouped = out.reshape(b, t, self.o_groups, -1)
        w_GOI = float_weight(self.o_a_proj, grouped.dtype).view(self.o_groups, -1, grouped.shape[-1])
        if b * t == 1 and not torch.is_grad_enabled():  # decode: one row per group, each group's block read once
            mixed = gather_gemv(w_GOI, list(range(self.o_groups)), grouped.view(self.o_groups, -1))
            return self.o_b_proj(mixed.view(b, t, -1))
        return self.o_b_proj(torch.einsum("btgi,goi->btgo", grouped, w_GOI).flatten(2))

    def _entries(self, compressor: Compressor, kv_BSX, gate_BSX, inputs: AttentionInputs, s: int, stored: list):
        """(each row's entries padded to the longest [B, W, dim], visible [B, T, W]: entry w reaches the query at
        position p once its window is complete, w < (p + 1) // rate); stored: [the cache's entry slots [B, S, dim]]
        to write them in, or []."""
        rows, keys_BS = [], inputs.key_positions_BS[:, :s]
        for i in range(kv_BSX.shape[0]):
            real = keys_BS[min(i, keys_BS.shape[0] - 1)] >= 0
            rows.append(compressor.entries(kv_BSX[i, real], gate_BSX[i, real], inputs.rope_at))
        width = max(r.shape[0] for r in rows)
        entries = kv_BSX.new_zeros(len(rows), width, compressor.dim)
        for i, r in enumerate(rows):
            entries[i, : r.shape[0]] = r
        counts = torch.tensor([r.shape[0] for r in rows], device=kv_BSX.device)
        pos_BT1 = inputs.query_index_BT.expand(len(rows), -1).unsqueeze(-1)
        w = torch.arange(width, device=kv_BSX.device)
        visible = (w < (pos_BT1 + 1) // compressor.rate) & (w < counts[:, None, None])
        for slots_BSd in stored:
            slots_BSd.copy_(_at_last_slots(entries, keys_BS, compressor.rate))
        return entries, visible


def _at_last_slots(entries_BWd: torch.Tensor, keys_BS: torch.Tensor, rate: int) -> torch.Tensor:
    """[B, S, dim]: each entry at the key slot of its window's last token (position (w + 1) * rate - 1 of its row),
    zeros elsewhere."""
    b, width, dim = entries_BWd.shape
    w_BS = ((keys_BS + 1) // rate - 1).expand(b, -1)
    done_BS = (keys_BS >= 0) & ((keys_BS + 1) % rate == 0) & (w_BS < width)
    if width == 0:
        return entries_BWd.new_zeros(b, keys_BS.shape[1], dim)
    picked = entries_BWd.gather(1, w_BS.clamp(0, width - 1).unsqueeze(-1).expand(-1, -1, dim))
    return torch.where(done_BS.unsqueeze(-1), picked, 0)
