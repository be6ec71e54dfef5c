"""The decoder-only transformer assembled from a ModelConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moekit._validate import check_int
from moekit.config.attention import RECURRENT
from moekit.config.model import ModelConfig
from moekit.experts import huge_pages
from moekit.infer.cache import KVCache
from moekit.layers.attention import AttentionInputs, causal_mask, mask_positions
from moekit.layers.decoder_layer import DecoderLayer
from moekit.layers.hyper import HyperHead
from moekit.layers.linear import Linear
from moekit.layers.moe import MoEBlock, MoEInfo
from moekit.layers.norm import make_norm
from moekit.layers.rope import RotaryEmbedding
from moekit.model.mtp import MultiTokenPrediction
from moekit.routing.router import warn_causality


@dataclass
class DecoderOutput:
    """logits [B, T, V]; aux_loss: sum of all balancing losses; moe: {layer index: MoEInfo}; mtp_logits: with
    return_mtp, one [B, T - 1 - j, V] per multi-token-prediction depth j, position i predicting token i + 2 + j
    (their MoE layers' routing joins `moe` under indices num_layers + j, their balancing losses aux_loss)."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe: dict[int, MoEInfo] = field(default_factory=dict)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)


class MoEDecoder(nn.Module):
    """Embedding, decoder layers, final norm, LM head. Random init N(0, init_std) like Hugging Face models.

    The modules are the pure PyTorch reference. moekit.infer.fast.prepare_inference(model) installs faster steps
    from outside (`fused` here, on the layers and the MoE blocks); drop_fused() removes them, and changing the
    backend, the dtype or device (`to`, `float`, ...) or loading a state dict does so too."""

    # the whole decode step, installed from outside: (input_ids, cache, routing) -> (logits, routing by layer or
    # None), or None where it does not apply
    fused = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        if cfg.moe is not None and cfg.moe_layers:
            warn_causality(cfg.moe)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.rotary = RotaryEmbedding(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        sliding_theta = cfg.attention.sliding_rope_theta  # sliding layers' own plain rope (MiMo-V2-Flash)
        self.rotary_sliding = RotaryEmbedding(cfg.rope_dim, sliding_theta) if sliding_theta is not None else None
        self.mtp = nn.ModuleList(MultiTokenPrediction(cfg, j) for j in range(cfg.mtp_layers))
        streams = cfg.hyper_streams  # hyper-connections: the streams' last collapse before the final norm
        self.hc_head = HyperHead(cfg.hidden_size, streams, cfg.hyper_eps, cfg.norm_eps) if streams > 1 else None
        if not self.embed_tokens.weight.is_meta:  # a meta model (counting, loading) has nothing to initialise
            huge_pages.rehome(self)
            self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoEBlock):
                module.experts.reset_parameters(std)
                if getattr(module.router, "weight", None) is not None:
                    nn.init.normal_(module.router.weight, std=std)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Continue input_ids [B, T] by max_new_tokens with a KV cache: greedy by default; temperature, top_k,
        top_p, eos_token_id, attention_mask (left padding), seed, on_token (streaming), speculative (MTP drafts)
        and stats as in moekit.infer.generate.generate."""
        from moekit.infer.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def moe_blocks(self) -> dict[int, MoEBlock]:
        """The MoE blocks by layer index (multi-token-prediction layers follow the main ones)."""
        layers = [*self.layers, *(m.layer for m in self.mtp)]
        return {i: layer.mlp for i, layer in enumerate(layers) if isinstance(layer.mlp, MoEBlock)}

    def attention_inputs(
        self,
        positions_BT: torch.Tensor,
        attention_mask,
        num_queries: int,
        num_keys: int,
        dtype,
        cache=None,
        query_keys_BT: torch.Tensor | None = None,
    ) -> AttentionInputs:
        """Rotary cos/sin, one mask per layer type in use and the KV cache, shared by all layers of a pass.
        query_keys_BT: each query's own key index per row, where rows differ (a ragged cache); else the queries
        are the last num_queries keys."""
        a, device = self.config.attention, positions_BT.device
        kinds = (set(a.layer_types or ()) - set(RECURRENT)) | {"full"}  # recurrent layers take no mask
        if a.kind == "compressed":  # every layer attends over a sliding window (and its compressed entries)
            kinds = (kinds - {"compressed", "heavily_compressed"}) | {"sliding"}
        limits = {"full": {}, "sliding": {"window": a.sliding_window}, "chunked": {"chunk": a.chunk_size}}
        # plain causal (training, an uncached prompt, a decode step): no mask, attention takes SDPA's own path
        plain = attention_mask is None and query_keys_BT is None and num_queries in (1, num_keys)
        masks = {
            kind: None
            if kind == "full" and plain
            else causal_mask(attention_mask, num_queries, num_keys, device, **limits[kind], query_keys_BT=query_keys_BT)
            for kind in kinds
        }
        rope = self.rotary(positions_BT, dtype, per_row=query_keys_BT is not None)
        sliding = self.rotary_sliding(positions_BT, dtype) if self.rotary_sliding is not None else None
        inputs = AttentionInputs(rope, masks, positions_BT, cache, sliding)
        if a.kind == "compressed":
            inputs.rope_at = lambda pos_1W: self.rotary(pos_1W, dtype)
            inputs.key_positions_BS = _key_positions(attention_mask, query_keys_BT, num_keys, device)
        return inputs

    def routers(self) -> list[nn.Module]:
        return [block.router for block in self.moe_blocks().values()]

    def set_backend(self, name: str, matmul: str = "auto") -> None:
        """Every MoE block's experts backend (see MoEBlock.set_backend)."""
        self.drop_fused()
        for block in self.moe_blocks().values():
            block.set_backend(name, matmul)

    def drop_fused(self) -> None:
        """Remove every installed fused step: the modules alone compute the model again."""
        for module in self.modules():
            module.__dict__.pop("fused", None)  # the class default (None) shows again

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(), ...: the fused steps hold the old tensors
        self.drop_fused()
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.drop_fused()
        return super().load_state_dict(state_dict, strict, assign)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_routing: bool = False,
        cache: KVCache | None = None,
        return_mtp: bool = False,
        logits_to_keep: int = 0,
    ) -> torch.Tensor | DecoderOutput:
        """input_ids [B, T] -> logits [B, T, V]; with return_routing, a DecoderOutput that also carries the balancing
        loss and per-layer routing. attention_mask [B, T]: 1 for real tokens, 0 for padding (either side). With a
        KVCache the tokens continue the cached ones and attention_mask covers cached + new tokens [B, S + T].
        return_mtp (training, no cache): also the multi-token-prediction logits (implies return_routing).
        logits_to_keep: only the last n positions' logits (0: all), as in transformers; a prompt's prefill needs
        one, and the output head is a large share of its work."""
        check_int("logits_to_keep", logits_to_keep, 0)
        if self.fused is not None and cache is not None and attention_mask is None and not return_mtp:
            out = self.fused(input_ids, cache, return_routing)  # the whole decode step, where installed
            if out is not None:
                logits, infos = out
                if infos is None:
                    return logits
                return DecoderOutput(logits, logits.new_zeros((), dtype=torch.float32), infos)
        x_BTD, infos, positions_BT, token_mask_BT = self._trunk(input_ids, attention_mask, cache)
        logits = self.head(x_BTD[:, -logits_to_keep:] if logits_to_keep else x_BTD)
        if not (return_routing or return_mtp):
            return logits
        mtp_logits = self._mtp(x_BTD, input_ids, positions_BT, token_mask_BT, infos) if return_mtp else []
        aux = sum((info.aux_loss for info in infos.values()), logits.new_zeros((), dtype=torch.float32))
        return DecoderOutput(logits, aux, infos, mtp_logits)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The last layer's output [B, T, D] before the final norm (what `head` and the MTP modules read)."""
        return self._trunk(input_ids, None, cache)[0]

    def head(self, h_BTD: torch.Tensor, mtp_depth: int | None = None) -> torch.Tensor:
        """Logits [B, T, V] of the main model, or of multi-token-prediction depth mtp_depth, from its hidden state."""
        norm = self.norm if mtp_depth is None else self.mtp[mtp_depth].norm
        logits = self.lm_head(norm(h_BTD))
        scaling = self.config.logits_scaling
        return logits if scaling == 1.0 else logits / scaling

    def mtp_step(
        self,
        depth: int,
        h_BTD: torch.Tensor,
        next_ids_BT: torch.Tensor,
        positions_BT: torch.Tensor,
        token_mask_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, MoEInfo | None]:
        """Multi-token-prediction depth `depth` at positions_BT: the previous depth's hidden state there and the
        tokens one step ahead of that depth's input -> its hidden state [B, T, D] and routing. With a cache (this
        depth's own) the positions continue the cached ones."""
        t = h_BTD.shape[1]
        past = cache.length if cache is not None else 0
        inputs = self.attention_inputs(positions_BT, None, t, past + t, h_BTD.dtype, cache)
        out = self.mtp[depth](h_BTD, self.embed_tokens(next_ids_BT), inputs, next_ids_BT, token_mask_BT)
        if cache is not None:
            cache.advance(t)
        return out

    def _trunk(self, input_ids, attention_mask, cache):
        """Embedding and decoder layers: (hidden [B, T, D], routing by layer, positions [B, T], token mask)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids shape {tuple(input_ids.shape)} is invalid: allowed [batch, tokens]")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids hold ids outside the vocabulary: allowed [0, {self.config.vocab_size - 1}]")
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        token_mask_BT = None
        if attention_mask is not None:
            if cache is not None and cache.ragged:
                raise ValueError("attention_mask is not supported with a ragged cache: allowed None")
            if attention_mask.shape != (b, past + t):
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} is invalid: allowed {(b, past + t)}"
                )
            positions_BT = mask_positions(attention_mask)[:, past:]
            token_mask_BT = attention_mask[:, past:]
        elif cache is not None and cache.ragged:  # rows at different positions (a server's batch): masks per row
            positions_BT = cache.positions_BT(t, input_ids.device)
        else:
            positions_BT = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        x_BTD = self.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x_BTD = x_BTD * self.config.embedding_multiplier
        if self.hc_head is not None:  # hyper-connections: the residual as n streams
            x_BTD = x_BTD.unsqueeze(2).expand(-1, -1, self.config.hyper_streams, -1).contiguous()
        ragged = cache is not None and cache.ragged
        inputs = self.attention_inputs(
            positions_BT, attention_mask, t, past + t, x_BTD.dtype, cache, positions_BT if ragged else None
        )
        inputs.token_mask_BT = token_mask_BT
        infos: dict[int, MoEInfo] = {}
        for i, layer in enumerate(self.layers):
            x_BTD, info = layer(x_BTD, inputs, input_ids, token_mask_BT)
            if info is not None:
                infos[i] = info
        if cache is not None:
            cache.advance(t)
        if self.hc_head is not None:
            x_BTD = self.hc_head(x_BTD)
        return x_BTD, infos, positions_BT, token_mask_BT

    def _mtp(self, h_BTD, input_ids, positions_BT, token_mask_BT, infos: dict) -> list[torch.Tensor]:
        """DeepSeek-V3's sequential MTP: depth j combines its previous hidden state at position i with the
        embedding of token i + 1 + j and predicts token i + 2 + j."""
        out = []
        for j in range(len(self.mtp)):
            t = h_BTD.shape[1] - 1
            if t < 1:
                break
            mask_BT = None if token_mask_BT is None else token_mask_BT[:, j + 1 : j + 1 + t]
            h_BTD, info = self.mtp_step(j, h_BTD[:, :t], input_ids[:, j + 1 : j + 1 + t], positions_BT[:, :t], mask_BT)
            if info is not None:
                infos[self.config.num_layers + j] = info
            out.append(self.head(h_BTD, j))
        return out


def _key_positions(attention_mask_BS, query_keys_BT, num_keys: int, device) -> torch.Tensor:
    """Each key slot's position in its row [B or 1, S]: -1 for padding, and for a ragged cache's slots past the
    row's last query."""
    if attention_mask_BS is not None:
        return torch.where(attention_mask_BS.bool(), mask_positions(attention_mask_BS), -1)
    keys_1S = torch.arange(num_keys, device=device)[None]
    if query_keys_BT is None:
        return keys_1S
    return torch.where(keys_1S <= query_keys_BT.max(-1, keepdim=True).values, keys_1S, -1)
