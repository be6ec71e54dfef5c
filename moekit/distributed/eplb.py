"""Expert placement for expert parallelism from measured loads: DeepSeek's EPLB algorithm as published (DeepSeek-V3
technical report; deepseek-ai/EPLB). Hot experts get redundant copies (each new copy goes to the expert with the
highest load per copy), and the copies are packed onto GPUs so that every GPU holds the same number of them and
as even a load as a greedy packing gets (heaviest first, each to the lightest GPU with room).

Hierarchical where the expert groups of group-limited routing divide over the nodes (the groups are packed onto
nodes first, so that a token's groups stay on few nodes, then copies are made and packed within each node); global
otherwise (one node, one group). loads: [layers, experts], any non-negative measure (tokens per expert)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Placement:
    """physical_to_logical [layers, slots]: the expert each GPU slot holds (GPU g holds slots [g S/G, (g+1) S/G));
    replica [layers, slots]: which copy of its expert a slot holds; copies [layers, experts]: copies per expert."""

    physical_to_logical: torch.Tensor
    replica: torch.Tensor
    copies: torch.Tensor

    def gpu_loads(self, loads: torch.Tensor, gpus: int) -> torch.Tensor:
        """[layers, gpus]: each GPU's load, every copy of an expert taking an equal share of its load."""
        share = (loads.double() / self.copies.double()).gather(-1, self.physical_to_logical)
        return share.view(loads.shape[0], gpus, -1).sum(-1)


def balanced_packing(weights: torch.Tensor, packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's n items into `packs` packs of n / packs items each, heaviest first, each to the lightest pack with
    room (ties: the lower pack). Returns (pack [rows, n], rank within its pack [rows, n])."""
    rows, n = weights.shape
    if n % packs:
        raise ValueError(f"{n} items do not split into {packs} equal packs")
    per_pack = n // packs
    pack = torch.full((rows, n), -1, dtype=torch.long)
    rank = torch.full((rows, n), -1, dtype=torch.long)
    for r in range(rows):
        load, count = [0.0] * packs, [0] * packs
        for item in weights[r].double().sort(descending=True, stable=True).indices.tolist():
            p = min((p for p in range(packs) if count[p] < per_pack), key=lambda p: load[p])
            pack[r, item], rank[r, item] = p, count[p]
            load[p] += float(weights[r, item])
            count[p] += 1
    return pack, rank


def replicate(weights: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's n experts over `slots` >= n copies: one each, then every further copy to the expert with the
    highest load per copy. Returns (slot -> expert [rows, slots], slot -> copy index [rows, slots], copies
    [rows, n])."""
    rows, n = weights.shape
    if slots < n:
        raise ValueError(f"{slots} slots cannot hold {n} experts: allowed at least one slot per expert")
    expert = torch.arange(slots).repeat(rows, 1)
    copy = torch.zeros(rows, slots, dtype=torch.long)
    copies = torch.ones(rows, n, dtype=torch.long)
    for s in range(n, slots):
        hottest = (weights.double() / copies).argmax(-1)
        expert[:, s] = hottest
        copy[:, s] = copies[torch.arange(rows), hottest]
        copies[torch.arange(rows), hottest] += 1
    return expert, copy, copies


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm))
    return inverse


def place_experts(loads: torch.Tensor, slots: int, groups: int, nodes: int, gpus: int) -> Placement:
    """The placement of [layers, experts] loads over `slots` expert slots (experts + redundant copies) on `gpus`
    GPUs of `nodes` nodes; groups: the expert groups of group-limited routing (1 if none)."""
    layers, experts = loads.shape
    if experts % groups or slots % gpus or gpus % nodes:
        raise ValueError(
            f"experts={experts}, groups={groups}, slots={slots}, gpus={gpus}, nodes={nodes}: allowed "
            "groups dividing the experts, GPUs dividing the slots, nodes dividing the GPUs"
        )
    if groups % nodes:  # the global policy: one node, one group
        groups, nodes = 1, 1
    if slots % nodes or experts % nodes:
        raise ValueError(f"{slots} slots or {experts} experts do not split over {nodes} nodes")
    group_size, per_node, slots_per_node = experts // groups, experts // nodes, slots // nodes
    loads = loads.double()
    # 1. groups onto nodes; node-major order of the experts ("mlog"): node n's experts [n per_node, (n+1) per_node)
    group_node, group_rank = balanced_packing(loads.view(layers, groups, group_size).sum(-1), nodes)
    first = (group_node * (groups // nodes) + group_rank) * group_size
    to_mlog = (first.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)  # logical -> node-major
    from_mlog = _inverse(to_mlog)
    # 2. copies within each node
    node_loads = loads.gather(-1, from_mlog).view(layers * nodes, per_node)
    slot_mlog, slot_copy, mlog_copies = replicate(node_loads, slots_per_node)
    # 3. each node's copies onto its GPUs
    per_copy = (node_loads / mlog_copies).gather(-1, slot_mlog)
    gpu, rank = balanced_packing(per_copy, gpus // nodes)
    placed = _inverse(gpu * (slots // gpus) + rank)  # physical slot -> the node's copy there
    physical_mlog = slot_mlog.gather(-1, placed).view(layers, nodes, -1)
    physical_mlog = (physical_mlog + torch.arange(nodes).view(1, -1, 1) * per_node).flatten(-2)
    return Placement(
        physical_to_logical=from_mlog.gather(-1, physical_mlog),
        replica=slot_copy.gather(-1, placed).view(layers, -1),
        copies=mlog_copies.view(layers, -1).gather(-1, to_mlog),
    )


def contiguous_loads(loads: torch.Tensor, gpus: int) -> torch.Tensor:
    """[layers, gpus]: each GPU's load with no placement (GPU g holds experts [g E/G, (g+1) E/G), one copy each),
    what moekit's expert parallelism does today."""
    return loads.double().view(loads.shape[0], gpus, -1).sum(-1)
