"""Local dispatch: sort the routed rows by expert, run the experts, put the outputs back in token order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moekit.routing.plan import RoutingPlan


@dataclass
class Dispatched:
    """x_SD: the rows of every assignment, grouped by expert; counts[e]: how many rows expert e has;
    order_S: for each sorted row, its assignment index in the plan."""

    x_SD: torch.Tensor
    counts: list[int]
    order_S: torch.Tensor


class LocalDispatcher:
    """Dispatch and combine on one device. Combine is deterministic: each token's outputs are summed over its
    slots in slot order, never accumulated by atomics."""

    def dispatch(self, x_TD: torch.Tensor, plan: RoutingPlan) -> Dispatched:
        order_S = torch.argsort(plan.expert_ids_N, stable=True)
        x_SD = x_TD.index_select(0, plan.token_ids_N[order_S])  # a row gather: several times faster than x[idx]
        if plan.apply_to == "input":
            x_SD = x_SD * plan.weights_N[order_S].unsqueeze(-1).to(x_SD.dtype)
        counts = plan.tokens_per_expert_E.tolist()
        return Dispatched(x_SD, counts, order_S)

    def combine(self, y_SD: torch.Tensor, d: Dispatched, plan: RoutingPlan) -> torch.Tensor:
        num_tokens, hidden = plan.num_tokens, y_SD.shape[-1]
        inverse_N = torch.empty_like(d.order_S)
        inverse_N[d.order_S] = torch.arange(d.order_S.numel(), device=d.order_S.device)
        y_ND = y_SD.index_select(0, inverse_N)
        if plan.dense and plan.apply_to == "output":  # weighted sum over each token's slots in one pass
            weights_T1K = plan.weights_N.view(num_tokens, 1, plan.num_slots).to(y_ND.dtype)
            return torch.bmm(weights_T1K, y_ND.view(num_tokens, plan.num_slots, hidden)).squeeze(1)
        if plan.apply_to == "output":
            y_ND = y_ND * plan.weights_N.unsqueeze(-1).to(y_ND.dtype)
        if plan.dense:
            return y_ND.view(num_tokens, plan.num_slots, hidden).sum(1)
        slots_TKD = y_ND.new_zeros(num_tokens, plan.num_slots, hidden)
        slots_TKD = slots_TKD.index_put((plan.token_ids_N, plan.slot_N), y_ND)
        return slots_TKD.sum(1)

    def run(
        self,
        x_TD: torch.Tensor,
        plan: RoutingPlan,
        experts_fn: Callable[[torch.Tensor, list[int]], torch.Tensor],
    ) -> torch.Tensor:
        d = self.dispatch(x_TD, plan)
        return self.combine(experts_fn(d.x_SD, d.counts), d, plan)
