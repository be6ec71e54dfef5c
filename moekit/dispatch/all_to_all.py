"""Expert-parallel dispatch: each rank of a process group holds E / W of the routed experts (rank r experts
[r E / W, (r + 1) E / W)); a batch's rows go to the ranks of their experts and come back by all-to-all.

Per MoE layer and step: the local sort by expert (LocalDispatcher.dispatch), one all-to-all of the counts per
expert, one of the rows (uneven splits, through the autograd-aware functional collective, so gradients flow back
the same way), the rank's own experts on the rows they received (grouped by expert, each expert's rows in source
rank order), the rows back, and the local combine. Where every rank holds a contiguous share of a global batch, an
expert's rows come in the global batch's order and the combine sums each token's slots in slot order: the results
are those of one process on the whole batch (to the rounding of different matmul shapes)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from moekit.dispatch.local import LocalDispatcher
from moekit.experts.backends import ExpertsBackend
from moekit.experts.weights import ExpertWeights
from moekit.routing.plan import RoutingPlan


class BatchShares:
    """The ranks that hold contiguous equal shares of one batch, in rank order (all of them, also with a
    data-parallel dimension beside the experts'): what batch statistics (the aux loss's expert fractions, the
    capacity's drops) are reduced over."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group or dist.group.WORLD
        self.rank, self.ranks = dist.get_rank(self.group), dist.get_world_size(self.group)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[ranks, *t.shape]: every rank's t (no gradient)."""
        parts = [torch.empty_like(t) for _ in range(self.ranks)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        return t


class AllToAllDispatcher(LocalDispatcher):
    """Dispatch and combine across the ranks of `group` (None: the default group), dropless: every row reaches its
    expert's rank whatever the counts. shares: the ranks sharing the batch (default: those of `group`)."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None, shares: BatchShares | None = None):
        self.group = group or dist.group.WORLD
        self.shares = shares or BatchShares(self.group)
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if num_experts % self.world:
            raise ValueError(f"{num_experts} experts do not split over {self.world} ranks: allowed a divisor of them")
        self.local = num_experts // self.world  # experts per rank
        # what the forward passes exchanged so far (a backward repeats it in reverse): bytes this rank sent to the
        # other ranks, and seconds in the collectives (waits included)
        self.sent_bytes, self.seconds = 0, 0.0

    def run(self, x_TD: torch.Tensor, plan: RoutingPlan, backend: ExpertsBackend, experts: ExpertWeights):
        d = self.dispatch(x_TD, plan)
        return self.combine(self.exchange(d.x_SD, plan.tokens_per_expert_E, backend, experts), d, plan)

    def exchange(
        self, x_SD: torch.Tensor, counts_E: torch.Tensor, backend: ExpertsBackend, experts: ExpertWeights
    ) -> torch.Tensor:
        """The experts' outputs [S, D] of rows x_SD sorted by (global) expert, counts_E rows each, computed on the
        ranks that hold them."""
        w, local = self.world, self.local
        start = time.perf_counter()
        counts_WL = counts_E.to(torch.long).view(w, local)
        received_WL = torch.empty_like(counts_WL)  # [source rank, local expert]
        dist.all_to_all_single(received_WL, counts_WL, group=self.group)
        sent, got = counts_WL.sum(1).tolist(), received_WL.sum(1).tolist()
        x_RD = wait_tensor(all_to_all_single_autograd(x_SD.contiguous(), got, sent, self.group))
        # rows come [source][expert][row]; the experts take them [expert][source][row]
        expert_R = torch.arange(local, device=x_SD.device).repeat(w).repeat_interleave(received_WL.flatten())
        by_expert_R = torch.argsort(expert_R, stable=True)
        self.seconds += time.perf_counter() - start
        y_RD = backend(x_RD.index_select(0, by_expert_R), received_WL.sum(0).tolist(), experts)
        back_R = torch.empty_like(by_expert_R)
        back_R[by_expert_R] = torch.arange(by_expert_R.numel(), device=by_expert_R.device)
        start = time.perf_counter()
        y_SD = wait_tensor(all_to_all_single_autograd(y_RD.index_select(0, back_R).contiguous(), sent, got, self.group))
        self.seconds += time.perf_counter() - start
        row = x_SD.shape[-1] * x_SD.element_size()
        self.sent_bytes += (sum(sent) - sent[self.rank] + sum(got) - got[self.rank]) * row
        return y_SD

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks sharing the batch (no gradient): the aux loss's expert counts."""
        return self.shares.sum_over_ranks(t)
