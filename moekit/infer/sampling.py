"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), and the checks of those
settings; shared by plain and speculative generation."""

from __future__ import annotations

import torch

from moekit._validate import check_float, check_int


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
