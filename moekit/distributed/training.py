"""What the trainer does differently over several processes, in one place: OneProcess does nothing of it;
ExpertParallelRun (moekit train --ep N under torchrun, N dividing the process count: the rest is data parallel)
shards the experts, gives each rank its share of every global batch, makes the gradients, gradient norm, metrics
and expert loads those of the whole batch, and reads and writes checkpoints as one process would (gathered on
save, cut to the rank's share on load: a run saved at one EP size resumes at another). Rank 0 writes; the run
directory must be on a file system every rank reads."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.expert_parallel import (
    clip_grad_norm,
    full_optimizer_state,
    full_state_dict,
    local_optimizer_state,
    local_state_dict,
    parallelize_experts,
    sync_gradients,
)
from moekit.distributed.launch import is_main


class OneProcess:
    """The whole batch, the whole model, here."""

    ranks = 1
    main = True

    def prepare(self, model: nn.Module, batch_size: int) -> None:
        pass

    def share(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return ids_BT

    def finish_gradients(self, model: nn.Module, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def mean(self, values: list[float]) -> list[float]:
        return values

    def sum_loads(self, loads) -> None:
        pass

    def state(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return model, optimizer

    def localize(self, optimizer: torch.optim.Optimizer):
        """load_checkpoint's mapping of the stored (weights, optimizer state) to this process's share: none."""
        return None

    def full_model(self, model: nn.Module) -> nn.Module:
        return model

    def barrier(self) -> None:
        pass


class ExpertParallelRun(OneProcess):
    """The default process group's W ranks as a (data parallel W / ep) x (expert parallel ep) mesh: each rank holds
    E / ep experts of each MoE layer (the same share as the other ranks of its column) and batch_size / W sequences
    of each global batch."""

    def __init__(self, ep: int | None = None) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.group = dist.group.WORLD
        self.ranks, self.rank, self.main = dist.get_world_size(), dist.get_rank(), is_main()
        ep = ep or self.ranks
        if self.ranks % ep:
            raise ValueError(f"--ep {ep} with {self.ranks} processes: allowed a divisor of the process count")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (self.ranks // ep, ep), mesh_dim_names=("dp", "ep"))
        self.ep_group, self.dp_group = mesh.get_group("ep"), mesh.get_group("dp")
        self.replicas = self.ranks // ep
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, batch_size: int) -> None:
        if batch_size % self.ranks:
            raise ValueError(f"batch_size={batch_size} does not split over {self.ranks} ranks: allowed a multiple")
        parallelize_experts(model, self.ep_group, self.group)
        self.model = model

    def share(self, ids_BT: torch.Tensor) -> torch.Tensor:
        rows = ids_BT.shape[0] // self.ranks
        return ids_BT[self.rank * rows : (self.rank + 1) * rows]

    def finish_gradients(self, model: nn.Module, max_norm: float) -> float:
        sync_gradients(model, self.group, self.dp_group if self.replicas > 1 else None)
        return clip_grad_norm(model, max_norm, self.ep_group)

    def mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return (t / self.ranks).tolist()

    def sum_loads(self, loads) -> None:
        """A LoadAccumulator's counts summed over the ranks (each counted its own share of the batch)."""
        for table in (loads.counts, loads.pairs):
            for counts in table.values():
                dist.all_reduce(counts, group=self.group)
        for table in (loads.assignments, loads.dropped):
            if table:
                t = torch.tensor([table[k] for k in sorted(table)], dtype=torch.long)
                dist.all_reduce(t, group=self.group)
                table.update(zip(sorted(table), t.tolist(), strict=True))

    def state(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(weights, optimizer state dict) as one process holds them (every rank calls it)."""
        return full_state_dict(model, self.ep_group), full_optimizer_state(optimizer, model, self.ep_group)

    def localize(self, optimizer: torch.optim.Optimizer):
        model = self.model
        return lambda weights, opt: (local_state_dict(model, weights), local_optimizer_state(optimizer, model, opt))

    def full_model(self, model: nn.Module) -> nn.Module:
        """A one-process copy of the model (every rank calls it; the experts gathered)."""
        from moekit.model.decoder import MoEDecoder

        weights = full_state_dict(model, self.ep_group)
        whole = MoEDecoder(model.config)
        whole.load_state_dict(weights)
        return whole

    def barrier(self) -> None:
        dist.barrier(group=self.group)
