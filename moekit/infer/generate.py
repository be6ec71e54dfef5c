"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit._validate import check_float, check_int
from moekit.infer.cache import KVCache


def filtered_logits(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The tempered logits with everything outside the top-k and the top-p nucleus at -inf (temperature > 0)."""
    logits_BV = logits_BV.float() / temperature
    if top_k:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        beyond_BV = probs_BV.cumsum(-1) - probs_BV > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_BV = sorted_BV.masked_fill(beyond_BV, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    return logits_BV


def distribution(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The probabilities [B, V] `sample` draws from: one-hot on the argmax at temperature 0."""
    if temperature == 0:
        return torch.zeros_like(logits_BV, dtype=torch.float32).scatter_(-1, logits_BV.argmax(-1, keepdim=True), 1.0)
    return filtered_logits(logits_BV, temperature, top_k, top_p).softmax(-1)


def sample(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """Next token ids [B]: argmax at temperature 0, else a draw from the tempered, top-k and top-p filtered softmax."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs_BV = filtered_logits(logits_BV, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    check_int("max_new_tokens", max_new_tokens, 0)
    check_float("temperature", temperature, 0.0)
    check_int("top_k", top_k, 0)
    check_float("top_p", top_p, 0.0, 1.0, lo_open=True)


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
        from moekit.infer.speculative import speculative_generate

        if attention_mask is not None:
            raise ValueError("attention_mask is not supported with speculative=True: allowed one unpadded sequence")
        return speculative_generate(
            model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, on_token, stats
        )
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    model.eval()
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
