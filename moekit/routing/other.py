"""Routers that are not token-choice top-k: expert choice, soft MoE and hash routing. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

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


def hash_route(token_ids_T: torch.Tensor, num_experts: int, top_k: int = 1) -> RoutingPlan:
    """Hash layers (Roller et al. 2021): a fixed hash of the token id picks the experts; weights 1/k. A baseline
    with no learned router."""
    check_int("top_k", top_k, 1, num_experts)
    # Knuth's multiplicative hash spreads consecutive ids; k consecutive experts from there are always distinct.
    first_T = (token_ids_T.long() * 2654435761 % (2**32)) % num_experts
    topk_ids_TK = (first_T.unsqueeze(1) + torch.arange(top_k, device=token_ids_T.device)) % num_experts
    weights_TK = torch.full(topk_ids_TK.shape, 1.0 / top_k, device=token_ids_T.device)
    return RoutingPlan.from_topk(topk_ids_TK, weights_TK, num_experts)


@dataclass
class SoftPlan:
    """Soft MoE (Puigcerver et al. 2023): every slot is a convex mix of the tokens of a sequence, every token a
    convex mix of the slot outputs. S = num_experts * slots_per_expert, slots of expert e at [e*spe, (e+1)*spe).

    dispatch_BTS  softmax over tokens (dim 1): each slot's mix of input tokens sums to 1.
    combine_BTS   softmax over slots (dim 2): each token's mix of slot outputs sums to 1.
    """

    dispatch_BTS: torch.Tensor
    combine_BTS: torch.Tensor
    num_experts: int
    slots_per_expert: int


def soft_route(logits_BTS: torch.Tensor, num_experts: int, token_mask_BT: torch.Tensor | None = None) -> SoftPlan:
    """Soft MoE weights from the slot logits x·Φ. Padding tokens (mask False) take no part in any slot."""
    logits = logits_BTS.float()
    if token_mask_BT is not None:
        logits_for_dispatch = logits.masked_fill(~token_mask_BT.bool().unsqueeze(-1), float("-inf"))
    else:
        logits_for_dispatch = logits
    dispatch_BTS = F.softmax(logits_for_dispatch, dim=1)
    combine_BTS = F.softmax(logits, dim=2)
    return SoftPlan(
        dispatch_BTS=dispatch_BTS.to(logits_BTS.dtype),
        combine_BTS=combine_BTS.to(logits_BTS.dtype),
        num_experts=num_experts,
        slots_per_expert=logits_BTS.shape[-1] // num_experts,
    )
