"""Expert parallelism installed on a built model from outside (as torchtitan's parallelize functions do): the
model code has no distributed branches. parallelize_experts(model) keeps on each rank of the group its share of
every MoE layer's routed experts and gives the layers the all-to-all dispatcher; everything else stays replicated.
Every rank then runs the model on its own share of the batch; sync_gradients after backward makes each rank's
gradients those of the whole batch's mean loss, as one process computes them."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.dispatch.all_to_all import AllToAllDispatcher
from moekit.experts.weights import ExpertWeights


class ShardedExperts(ExpertWeights):
    """A rank's share of a layer's routed experts: experts [first, first + num_experts) of total."""

    def __init__(self, experts: ExpertWeights, first: int, count: int):
        layout, d, f = experts.layout, experts.hidden_size, experts.expert_hidden
        super().__init__(count, d, f, layout)
        self.first, self.total = first, experts.num_experts
        with torch.no_grad():
            for name, p in experts.named_parameters(recurse=False):
                getattr(self, name).copy_(p[first : first + count])


def parallelize_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Shard every MoE block's routed experts over the ranks of `group` (None: the default group; its size must
    divide the expert count) and exchange tokens by all-to-all. Every rank must hold the same weights before (the
    same seed, or the same checkpoint)."""
    group = group or dist.group.WORLD
    for block in model.moe_blocks().values():
        if isinstance(block.experts, ShardedExperts):
            raise ValueError("parallelize_experts: the model's experts are sharded already")
        dispatcher = AllToAllDispatcher(block.cfg.num_experts, group)
        block.experts = ShardedExperts(block.experts, dispatcher.rank * dispatcher.local, dispatcher.local)
        block.dispatcher = dispatcher
    model.drop_fused()


@torch.no_grad()
def sync_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """After backward of each rank's loss on its share of the batch: every gradient becomes that of the ranks' mean
    loss. Replicated parameters: the mean over ranks (one all-reduce of all of them, flattened). Sharded experts
    already hold the sum over ranks (the all-to-all's backward brought every rank's rows): divided by the ranks."""
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    sharded = {id(p) for m in model.modules() if isinstance(m, ShardedExperts) for p in m.parameters()}
    replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in sharded]
    for p in replicated:  # every rank sends the same layout, also where a parameter got no gradient here
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if replicated:
        flat = torch.cat([p.grad.reshape(-1) for p in replicated])
        dist.all_reduce(flat, group=group)
        for p, g in zip(replicated, flat.split([p.numel() for p in replicated]), strict=True):
            p.grad.copy_(g.view_as(p.grad)).div_(world)
    for p in model.parameters():
        if id(p) in sharded and p.grad is not None:
            p.grad.div_(world)
