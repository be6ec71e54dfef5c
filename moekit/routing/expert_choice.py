"""Expert choice (Zhou et al. 2022): each expert takes its C best tokens of the batch. Pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit._validate import check_float, check_int
from moekit.routing.balancing import expert_capacity
from moekit.routing.plan import RoutingPlan, slots_within_token


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(k * T * capacity_factor / E) tokens per expert (Zhou et al. 2022), at most T."""
    return min(num_tokens, expert_capacity(num_tokens, num_experts, top_k, capacity_factor))


def expert_choice_route(logits_TE: torch.Tensor, top_k: int, capacity_factor: float = 1.0) -> RoutingPlan:
    """Each expert takes its C best tokens by softmax score. A token may get any number of experts, also none.

    Looks at every token of the batch at once, so in a causal LM a token's routing depends on later tokens."""
    num_tokens, num_experts = logits_TE.shape
    check_float("capacity_factor", capacity_factor, 0.0, lo_open=True)
    check_int("top_k", top_k, 1, num_experts)
    probs_TE = F.softmax(logits_TE.float(), dim=-1)
    capacity = expert_choice_capacity(num_tokens, num_experts, top_k, capacity_factor)
    weights_EC, token_ids_EC = probs_TE.t().topk(capacity, dim=-1)
    token_ids_N = token_ids_EC.reshape(-1)
    slot_N, num_slots = slots_within_token(token_ids_N, num_tokens)
    return RoutingPlan(
        token_ids_N=token_ids_N,
        expert_ids_N=torch.arange(num_experts, device=logits_TE.device).repeat_interleave(capacity),
        weights_N=weights_EC.reshape(-1).to(logits_TE.dtype),
        slot_N=slot_N,
        num_tokens=num_tokens,
        num_experts=num_experts,
        num_slots=num_slots,
        probs_TE=probs_TE,
        logits_TE=logits_TE,
    )
