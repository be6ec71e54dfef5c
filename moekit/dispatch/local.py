"""Local dispatch: sort the routed rows by expert, run the experts, put the outputs back in token order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.dispatch.gather import combine_slots, gather_tokens
from moekit.experts.backends import ExpertsBackend
from moekit.experts.weights import ExpertWeights
from moekit.routing.plan import RoutingPlan


@dataclass
class Dispatched:
    """x_SD: the rows of every assignment, grouped by expert; counts[e]: how many rows expert e has;
    order_S: for each sorted row, its assignment index in the plan; token_S: its token;
    row_N: for each assignment, its sorted row (the inverse of order_S)."""

    x_SD: torch.Tensor
    counts: list[int]
    order_S: torch.Tensor
    token_S: torch.Tensor
    row_N: torch.Tensor


class LocalDispatcher:
    """Dispatch and combine on one device. Combine is deterministic: each token's outputs are summed over its
    slots in slot order, never accumulated by atomics."""

    def dispatch(self, x_TD: torch.Tensor, plan: RoutingPlan) -> Dispatched:
        order_S = torch.argsort(plan.expert_ids_N, stable=True)
        token_S = plan.token_ids_N.index_select(0, order_S)
        row_N = torch.empty_like(order_S)
        row_N[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        if plan.dense:  # every token k rows: its gradient gathers them back (dispatch/gather.py)
            x_SD = gather_tokens(x_TD, token_S, row_N, plan.num_slots)
        else:
            x_SD = x_TD.index_select(0, token_S)  # a row gather: several times faster than x[idx]
        if plan.apply_to == "input":
            x_SD = x_SD * plan.weights_N[order_S].unsqueeze(-1).to(x_SD.dtype)
        counts = plan.tokens_per_expert_E.tolist()
        return Dispatched(x_SD, counts, order_S, token_S, row_N)

    def combine(self, y_SD: torch.Tensor, d: Dispatched, plan: RoutingPlan) -> torch.Tensor:
        if plan.dense:  # each token's rows summed in slot order, weighted unless the experts' inputs were
            weights_TK = None
            if plan.apply_to == "output":
                weights_TK = plan.weights_N.reshape(plan.num_tokens, plan.num_slots).to(y_SD.dtype)
            return combine_slots(y_SD, weights_TK, d.token_S, d.row_N, d.order_S, plan.num_slots)
        y_ND = y_SD.index_select(0, d.row_N)
        if plan.apply_to == "output":
            y_ND = y_ND * plan.weights_N.unsqueeze(-1).to(y_ND.dtype)
        slots_TKD = y_ND.new_zeros(plan.num_tokens, plan.num_slots, y_SD.shape[-1])
        slots_TKD = slots_TKD.index_put((plan.token_ids_N, plan.slot_N), y_ND)
        return slots_TKD.sum(1)

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks that share the batch (expert parallelism): in one process, t itself."""
        return t

    def run(self, x_TD: torch.Tensor, plan: RoutingPlan, backend: ExpertsBackend, experts: ExpertWeights):
        """The combined expert outputs [T, D] of the plan's assignments, computed by `backend`."""
        if plan.num_tokens == 1 and plan.dense:  # decode at batch 1: nothing to sort, the backend's direct path
            y_TD = backend.one_token(x_TD, plan.expert_ids_N, plan.weights_N, experts, plan.apply_to)
            if y_TD is not None:
                return y_TD
        d = self.dispatch(x_TD, plan)
        return self.combine(backend(d.x_SD, d.counts, experts), d, plan)
