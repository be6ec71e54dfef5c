"""One decoder layer: attention and an FFN (a dense FFN or an MoE block), each behind its norm with a residual."""

from __future__ import annotations

import torch
from torch import nn

from moekit.config.model import ModelConfig
from moekit.layers.attention import Attention, AttentionInputs
from moekit.layers.compressed import CompressedAttention
from moekit.layers.ffn import FeedForward, dense_layout
from moekit.layers.hyper import HyperConnection
from moekit.layers.linear_attention import GatedDeltaNet
from moekit.layers.mamba import Mamba2Mixer, MambaMixer
from moekit.layers.mla import LatentAttention
from moekit.layers.moe import MoEBlock, MoEInfo
from moekit.layers.norm import make_norm

ATTENTION = {"gqa": Attention, "mla": LatentAttention, "compressed": CompressedAttention}


class DecoderLayer(nn.Module):
    """fused: None, or the layer's faster steps installed from outside (moekit.infer.fast.prepare_inference): an
    object whose attention(x, inputs) and ffn(x) each return the block's result, or None where they do not apply.
    With hyper-connections (cfg.hyper_streams > 1) the layer takes and returns the streams [B, T, n, D]."""

    fused = None

    @property
    def self_attn(self) -> nn.Module:
        """The layer's token mixer: attention, linear attention (registered as linear_attn) or Mamba (as mamba)."""
        modules = self._modules
        return modules.get("self_attn") or modules.get("linear_attn") or modules["mamba"]

    def __init__(self, cfg: ModelConfig, index: int, moe: bool | None = None):
        """Layer `index` of cfg; moe overrides whether its FFN is an MoE block (multi-token-prediction layers)."""
        super().__init__()
        self.input_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        kind = cfg.attention.layer_type(index)
        if kind == "linear":  # under its checkpoints' name; self_attn reads it too
            self.linear_attn = GatedDeltaNet(cfg, index)
        elif kind in ("mamba", "mamba2"):
            self.mamba = (MambaMixer if kind == "mamba" else Mamba2Mixer)(cfg, index)
        else:
            self.self_attn = ATTENTION[cfg.attention.kind](cfg, index)
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.hyper = cfg.hyper_streams > 1
        self.residual_multiplier = cfg.residual_multiplier
        if self.hyper:
            hc = (cfg.hidden_size, cfg.hyper_streams, cfg.hyper_sinkhorn_iters, cfg.hyper_eps, cfg.norm_eps)
            self.attn_hc, self.ffn_hc = HyperConnection(*hc), HyperConnection(*hc)
        if cfg.is_moe_layer(index) if moe is None else moe:
            self.mlp: nn.Module = MoEBlock(cfg.hidden_size, cfg.layer_moe(index) or cfg.moe)
        else:
            layout = dense_layout(cfg.moe.layout) if cfg.moe else None
            self.mlp = FeedForward(cfg.hidden_size, cfg.dense_hidden, layout)

    def forward(
        self, x_BTD: torch.Tensor, inputs: AttentionInputs, token_ids_BT: torch.Tensor, token_mask_BT
    ) -> tuple[torch.Tensor, MoEInfo | None]:
        if self.hyper:
            return self._streams(x_BTD, inputs, token_ids_BT, token_mask_BT)
        fused = self.fused
        attended_BTD = fused.attention(x_BTD, inputs) if fused is not None else None
        if attended_BTD is None:
            attended_BTD = x_BTD + self._scaled(self.self_attn(self.input_layernorm(x_BTD), inputs))
        if fused is not None and token_mask_BT is None:
            out = fused.ffn(attended_BTD)
            if out is not None:
                return out
        y_BTD, info = self._ffn(self.post_attention_layernorm(attended_BTD), token_ids_BT, token_mask_BT)
        return attended_BTD + self._scaled(y_BTD), info

    def _scaled(self, y_BTD: torch.Tensor) -> torch.Tensor:
        """A block's output as its residual add takes it (muP's residual_multiplier)."""
        return y_BTD if self.residual_multiplier == 1.0 else y_BTD * self.residual_multiplier

    def _ffn(self, h_BTD: torch.Tensor, token_ids_BT, token_mask_BT) -> tuple[torch.Tensor, MoEInfo | None]:
        if isinstance(self.mlp, MoEBlock):
            return self.mlp(h_BTD, token_ids_BT, token_mask_BT)
        return self.mlp(h_BTD), None

    def _streams(self, x_BTnD, inputs: AttentionInputs, token_ids_BT, token_mask_BT):
        """The block pair over hyper-connected streams: each block reads its connection's collapse of them, its
        output is spread back and the streams mixed (no plain residual: the fused steps return the blocks' outputs
        alone)."""
        post, comb, collapsed_BTD = self.attn_hc(x_BTnD)
        fused = self.fused
        attended_BTD = fused.attention(collapsed_BTD, inputs) if fused is not None else None
        if attended_BTD is None:
            attended_BTD = self.self_attn(self.input_layernorm(collapsed_BTD), inputs)
        x_BTnD = HyperConnection.mix(x_BTnD, attended_BTD, post, comb)
        post, comb, collapsed_BTD = self.ffn_hc(x_BTnD)
        out = fused.ffn(collapsed_BTD) if fused is not None and token_mask_BT is None else None
        y_BTD, info = out or self._ffn(self.post_attention_layernorm(collapsed_BTD), token_ids_BT, token_mask_BT)
        return HyperConnection.mix(x_BTnD, y_BTD, post, comb), info
