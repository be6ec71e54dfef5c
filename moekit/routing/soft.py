"""Soft MoE (Puigcerver et al. 2023): slots that mix a sequence's tokens, tokens that mix the slots' outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
