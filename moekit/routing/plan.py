"""The contract between a router and the rest of the MoE layer: a list of (token, expert, weight) assignments."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingPlan:
    """N assignments of tokens to experts, in any order.

    token_ids_N, expert_ids_N  which token runs through which expert.
    weights_N       the gate weight of each assignment (scales the expert output, or its input when apply_to='input').
    slot_N          rank of the assignment among its token's own (< num_slots): lets combine sum a token's outputs
                    in a fixed order, so results never depend on thread or atomic scheduling.
    probs_TE        routing distribution over all experts (sums to 1 per token), for balancing losses and metrics.
    logits_TE       raw router logits (z-loss).
    topk_ids_TK     the token-choice selection before any capacity dropping (aux loss counts), else None.
    dense           assignment i*num_slots + s belongs to token i, slot s, for every token (no drops): combine may
                    reshape instead of scatter.
    """

    token_ids_N: torch.Tensor
    expert_ids_N: torch.Tensor
    weights_N: torch.Tensor
    slot_N: torch.Tensor
    num_tokens: int
    num_experts: int
    num_slots: int
    apply_to: str = "output"
    probs_TE: torch.Tensor | None = None
    logits_TE: torch.Tensor | None = None
    topk_ids_TK: torch.Tensor | None = None
    dense: bool = False
    num_dropped: int = 0

    @property
    def tokens_per_expert_E(self) -> torch.Tensor:
        return torch.bincount(self.expert_ids_N, minlength=self.num_experts)

    @classmethod
    def from_topk(
        cls,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        num_experts: int,
        apply_to: str = "output",
        probs_TE: torch.Tensor | None = None,
        logits_TE: torch.Tensor | None = None,
    ) -> RoutingPlan:
        num_tokens, top_k = topk_ids_TK.shape
        device = topk_ids_TK.device
        return cls(
            token_ids_N=torch.arange(num_tokens, device=device).repeat_interleave(top_k),
            expert_ids_N=topk_ids_TK.reshape(-1),
            weights_N=topk_weights_TK.reshape(-1),
            slot_N=torch.arange(top_k, device=device).repeat(num_tokens),
            num_tokens=num_tokens,
            num_experts=num_experts,
            num_slots=top_k,
            apply_to=apply_to,
            probs_TE=probs_TE,
            logits_TE=logits_TE,
            topk_ids_TK=topk_ids_TK,
            dense=True,
        )

    def select(self, keep_N: torch.Tensor) -> RoutingPlan:
        """The plan with only the kept assignments (capacity dropping); slots are left as they were."""
        n_kept = int(keep_N.sum())
        return RoutingPlan(
            token_ids_N=self.token_ids_N[keep_N],
            expert_ids_N=self.expert_ids_N[keep_N],
            weights_N=self.weights_N[keep_N],
            slot_N=self.slot_N[keep_N],
            num_tokens=self.num_tokens,
            num_experts=self.num_experts,
            num_slots=self.num_slots,
            apply_to=self.apply_to,
            probs_TE=self.probs_TE,
            logits_TE=self.logits_TE,
            topk_ids_TK=self.topk_ids_TK,
            dense=self.dense and n_kept == keep_N.numel(),
            num_dropped=self.num_dropped + keep_N.numel() - n_kept,
        )


def slots_within_token(token_ids_N: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, int]:
    """Rank of each assignment among those of the same token (stable), and the largest count per token."""
    n = token_ids_N.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=token_ids_N.device), 1
    order_N = torch.argsort(token_ids_N, stable=True)
    counts_T = torch.bincount(token_ids_N, minlength=num_tokens)
    starts_T = torch.cumsum(counts_T, 0) - counts_T
    slot_N = torch.empty_like(token_ids_N)
    slot_N[order_N] = torch.arange(n, device=token_ids_N.device) - starts_T[token_ids_N[order_N]]
    return slot_N, max(int(counts_T.max()), 1)
