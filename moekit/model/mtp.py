"""DeepSeek-V3's multi-token prediction (MTP) module: from the main model's hidden state at position i and the
embedding of token i+1 it predicts token i+2 through one more decoder layer, sharing the embedding and the
output head with the main model. Used as an extra training signal and for self-speculative decoding."""

from __future__ import annotations

import torch
from torch import nn

from moekit.config.model import ModelConfig
from moekit.layers.attention import AttentionInputs
from moekit.layers.decoder_layer import DecoderLayer
from moekit.layers.moe import MoEInfo
from moekit.layers.norm import make_norm


class MultiTokenPrediction(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        d = cfg.hidden_size
        self.enorm, self.hnorm = make_norm(cfg.norm, d, cfg.norm_eps), make_norm(cfg.norm, d, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.layer = DecoderLayer(cfg, cfg.num_layers + depth, moe=cfg.moe is not None and bool(cfg.moe_layers))
        self.norm = make_norm(cfg.norm, d, cfg.norm_eps)

    def forward(
        self, h_BTD: torch.Tensor, next_embeds_BTD: torch.Tensor, inputs: AttentionInputs, token_ids_BT, mask_BT
    ) -> tuple[torch.Tensor, MoEInfo | None]:
        """h_BTD: the previous depth's hidden state at positions i; next_embeds_BTD: embeddings of tokens i+1.
        Returns the new hidden state (before the final norm) and the layer's routing."""
        x_BTD = self.eh_proj(torch.cat((self.enorm(next_embeds_BTD), self.hnorm(h_BTD)), dim=-1))
        return self.layer(x_BTD, inputs, token_ids_BT, mask_BT)
