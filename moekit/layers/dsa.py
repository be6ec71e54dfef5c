"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, GLM-5): a cheap scorer picks, for each query, the
`index_topk` earlier tokens MLA attends to. Its queries come from MLA's low-rank query (their own heads), its keys
are one LayerNorm'd vector per token (cached beside MLA's latent); a score is the ReLU'd dot product per head,
weighted per head by a projection of the token and summed. With no more keys than index_topk, every key is kept:
DSA then equals dense MLA."""

from __future__ import annotations

import torch
from torch import nn

from moekit.config.model import ModelConfig
from moekit.layers.linear import Linear
from moekit.layers.rope import apply_rope


def pick_top(
    q_BHTd: torch.Tensor, keys_BSd: torch.Tensor, weights_BTH: torch.Tensor, allowed_BTS: torch.Tensor, topk: int
) -> torch.Tensor:
    """Boolean [B, T, S]: each query's `topk` allowed keys by the index score sum_h w_h relu(q_h . k_s), the weights
    scaled by (heads * head_dim)^-1/2 (DeepSeek-V3.2's, GLM-5's and DeepSeek-V4's lightning indexers)."""
    heads, dim = q_BHTd.shape[1], q_BHTd.shape[-1]
    scores_BHTS = torch.relu(q_BHTd.float() @ keys_BSd.float().unsqueeze(1).transpose(-1, -2))
    weights_BTH = weights_BTH.float() * (heads**-0.5 * dim**-0.5)
    index_BTS = (weights_BTH.unsqueeze(-2) @ scores_BHTS.transpose(1, 2)).squeeze(-2)
    index_BTS = index_BTS.masked_fill(~allowed_BTS, float("-inf"))
    top_BTK = index_BTS.topk(min(topk, index_BTS.shape[-1]), dim=-1).indices
    return torch.zeros_like(index_BTS, dtype=torch.bool).scatter_(-1, top_BTK, True) & allowed_BTS


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.attention
        self.heads, self.head_dim, self.topk = a.index_heads, a.index_head_dim, a.index_topk
        self.rope_dim, self.interleave = a.qk_rope_head_dim, a.index_rope_interleave
        self.wq_b = Linear(a.q_lora_rank, self.heads * self.head_dim, bias=False)
        self.wk = Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(cfg.hidden_size, self.heads, bias=False)

    def _rope(self, x_BHTd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate the first rope_dim dimensions (the indexer's rotary part comes first, unlike MLA's)."""
        r = self.rope_dim
        return torch.cat((apply_rope(x_BHTd[..., :r], *rope, self.interleave), x_BHTd[..., r:]), dim=-1)

    def keys(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The tokens' indexer keys [B, T, head_dim] (what the cache keeps)."""
        return self._rope(self.k_norm(self.wk(x_BTD)).unsqueeze(1), rope).squeeze(1)

    def select(
        self,
        x_BTD: torch.Tensor,
        q_low_BTQ: torch.Tensor,
        keys_BSd: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        allowed_BTS: torch.Tensor,
    ) -> torch.Tensor:
        """Boolean [B, T, S]: the index_topk keys of each query among those allowed_BTS (causality, padding,
        broadcast over B) allows, by its index score."""
        b, t, _ = x_BTD.shape
        q_BHTd = self._rope(self.wq_b(q_low_BTQ).view(b, t, self.heads, self.head_dim).transpose(1, 2), rope)
        return pick_top(q_BHTd, keys_BSd, self.weights_proj(x_BTD), allowed_BTS, self.topk)
