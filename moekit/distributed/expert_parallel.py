"""Expert parallelism installed on a built model from outside (as torchtitan's parallelize functions do): the
model code has no distributed branches. parallelize_experts(model) keeps on each rank of the group its share of
every MoE layer's routed experts and gives the layers the all-to-all dispatcher; everything else stays replicated.
Every rank then runs the model on its own share of the batch; sync_gradients after backward makes each rank's
gradients those of the whole batch's mean loss, as one process computes them."""

from __future__ import annotations

import math
from itertools import chain

import torch
import torch.distributed as dist
from torch import nn

from moekit.dispatch.all_to_all import AllToAllDispatcher, BatchShares
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


def parallelize_experts(
    model: nn.Module, group: dist.ProcessGroup | None = None, batch_group: dist.ProcessGroup | None = None
) -> None:
    """Shard every MoE block's routed experts over the ranks of `group` (None: the default group; its size must
    divide the expert count) and exchange tokens by all-to-all; batch_group: the ranks sharing each batch (default
    `group`; the whole mesh where a data-parallel dimension sits beside the experts'). Every rank must hold the
    same weights before (the same seed, or the same checkpoint)."""
    group = group or dist.group.WORLD
    shares = BatchShares(batch_group or group)
    for block in model.moe_blocks().values():
        if isinstance(block.experts, ShardedExperts):
            raise ValueError("parallelize_experts: the model's experts are sharded already")
        dispatcher = AllToAllDispatcher(block.cfg.num_experts, group, shares)
        block.experts = ShardedExperts(block.experts, dispatcher.rank * dispatcher.local, dispatcher.local)
        block.dispatcher, block.router.shares = dispatcher, shares  # capacity spans the shares of a batch
    model.drop_fused()


@torch.no_grad()
def sync_gradients(
    model: nn.Module, group: dist.ProcessGroup | None = None, replica_group: dist.ProcessGroup | None = None
) -> None:
    """After backward of each rank's loss on its share of the batch: every gradient becomes that of the ranks' mean
    loss. group: all the ranks sharing the batch (default: all). Replicated parameters: the mean over them (one
    all-reduce of all of them, flattened). Sharded experts hold the sum over their expert-parallel group's ranks
    (the all-to-all's backward brought every rank's rows), summed over replica_group (the ranks holding the same
    share of the experts: the data-parallel group, None if none), then divided by the ranks."""
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    sharded = _owners(model)
    replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in sharded]
    for p in replicated:  # every rank sends the same layout, also where a parameter got no gradient here
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if replicated:
        _all_reduce_grads(replicated, group)
    experts = [p for p in model.parameters() if id(p) in sharded and p.grad is not None]
    if replica_group is not None and dist.get_world_size(replica_group) > 1 and experts:
        _all_reduce_grads(experts, replica_group)
    for p in replicated + experts:
        p.grad.div_(world)


def _owners(model: nn.Module) -> dict[int, ShardedExperts]:
    """{id(parameter): its ShardedExperts} of the model's expert-parallel parameters."""
    return {id(p): m for m in model.modules() if isinstance(m, ShardedExperts) for p in m.parameters()}


def _all_reduce_grads(params: list[torch.Tensor], group) -> None:
    """Sum the parameters' gradients over the group in one collective (flattened)."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p.grad))


def _sharded(model: nn.Module) -> dict[str, ShardedExperts]:
    """{parameter name: its ShardedExperts} of the model's expert-parallel parameters."""
    return {
        f"{name}.{p}" if name else p: m
        for name, m in model.named_modules()
        if isinstance(m, ShardedExperts)
        for p, _ in m.named_parameters(recurse=False)
    }


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def full_state_dict(model: nn.Module, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """The state dict one process would have: every sharded expert tensor gathered from all ranks (every rank
    calls it; every rank gets it)."""
    group = group or dist.group.WORLD
    sharded = _sharded(model)
    return {k: _gather(v, group) if k in sharded else v for k, v in model.state_dict().items()}


def local_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A one-process state dict cut to this rank's share of each sharded expert tensor."""
    sharded = _sharded(model)
    out = dict(full)
    for k, m in sharded.items():
        if k in out:
            out[k] = out[k][m.first : m.first + m.num_experts]
    return out


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return list(chain.from_iterable(g["params"] for g in optimizer.param_groups))


def full_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, group: dist.ProcessGroup | None = None
) -> dict:
    """optimizer.state_dict() with the per-parameter tensors of sharded experts (Adam's moments) gathered."""
    group = group or dist.group.WORLD
    sharded = _owners(model)
    state = optimizer.state_dict()
    state["state"] = {i: dict(entry) for i, entry in state["state"].items()}  # the optimizer's own dicts otherwise
    for index, p in enumerate(_optimizer_params(optimizer)):
        entry = state["state"].get(index, {})
        for key, value in entry.items():
            if id(p) in sharded and torch.is_tensor(value) and value.shape == p.shape:
                entry[key] = _gather(value, group)
    return state


def local_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, full: dict) -> dict:
    """A one-process optimizer state dict cut to this rank's share of each sharded expert's tensors."""
    owner = _owners(model)
    for index, p in enumerate(_optimizer_params(optimizer)):
        m = owner.get(id(p))
        for key, value in full["state"].get(index, {}).items():
            if m is not None and torch.is_tensor(value) and value.shape[1:] == p.shape[1:] and value.dim() == p.dim():
                full["state"][index][key] = value[m.first : m.first + m.num_experts]
    return full


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> float:
    """torch.nn.utils.clip_grad_norm_ over the whole model after sync_gradients: the norm one process computes,
    the sharded experts' gradients summed over `group`, the expert-parallel group (each share counted once)."""
    group = group or dist.group.WORLD
    sharded = _owners(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = torch.zeros(2, dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            local[int(id(p) in sharded)] += float(p.grad.double().square().sum())
    shared = local[1:].clone()
    dist.all_reduce(shared, group=group)
    norm = math.sqrt(float(local[0] + shared[0]))
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm
