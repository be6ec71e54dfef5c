"""Autoregressive generation with a KV cache: greedy or sampled (moekit.infer.sampling), or self-speculative."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.infer.cache import KVCache
from moekit.infer.fast import prepare_inference
from moekit.infer.sampling import check_sampling, sample
from moekit.infer.speculative import speculative_generate


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    seed: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    speculative: bool = False,
    stats=None,
) -> torch.Tensor:
    """input_ids [B, T] (left-padded with attention_mask when lengths differ) -> [B, T + n] with n <= max_new_tokens
    (all sequences stop early once each has produced eos_token_id). on_token gets each step's ids [B].
    speculative: draft with the model's multi-token-prediction layers and verify (batch 1, no mask; same output
    distribution, see moekit.infer.speculative); stats: a SpeculationStats to fill in."""
    if speculative:
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported with speculative=True: allowed one unpadded sequence")
        return speculative_generate(
            model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, on_token, stats
        )
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    model.eval()
    prepare_inference(model)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache()
    b = input_ids.shape[0]
    mask = attention_mask.long() if attention_mask is not None else None
    logits = model(input_ids, mask, cache=cache, logits_to_keep=1)[:, -1]
    out, done = [input_ids], torch.zeros(b, dtype=torch.bool)
    for step in range(max_new_tokens):
        next_B = sample(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            next_B = next_B.masked_fill(done, eos_token_id)
            done |= next_B == eos_token_id
        out.append(next_B[:, None])
        if on_token is not None:
            on_token(next_B)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if mask is not None:
            mask = torch.cat((mask, mask.new_ones(b, 1)), dim=1)
        logits = model(next_B[:, None], mask, cache=cache)[:, -1]
    return torch.cat(out, dim=1)
