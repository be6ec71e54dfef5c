"""Expert parallelism on torch.distributed (gloo, processes on this machine): 2 and 4 ranks, each holding its share
of the experts and of a global batch, give one process's losses, aux losses, gradients and selection-bias updates
over steps of training (fp32, relative 1e-5)."""

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moekit
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.distributed.expert_parallel import ShardedExperts, parallelize_experts, sync_gradients
from moekit.routing.balancing import LossFreeBalancer
from moekit.routing.spec import RoutingSpec

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

STEPS, BATCH, SEQ, VOCAB = 6, 4, 16, 256
CASES = {  # token choice in groups with a shared expert and the loss-free bias; top-1 with the Switch aux loss
    "groups+shared+bias": dict(
        routing=RoutingSpec(
            num_experts=8, top_k=2, score_func="sigmoid", n_group=4, topk_group=2, selection_bias=True, normalize=True
        ),
        num_shared_experts=1,
        bias_update_rate=0.01,
        seq_aux_loss_coef=0.001,
    ),
    "top1+aux": dict(routing=RoutingSpec(num_experts=8, top_k=1), aux_loss_coef=0.01, z_loss_coef=0.001),
}


def _model(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    moe = MoEConfig(expert_hidden=32, **CASES[case])
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, moe=moe, vocab_size=VOCAB)
    return moekit.from_config(cfg).train()


def _train(model, ids_BT: torch.Tensor, sync=None) -> list[tuple[float, float]]:
    """(loss, aux loss) per step of SGD on ids_BT (this rank's share of the global batch)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    balancer = LossFreeBalancer(model.routers(), model.config.moe.bias_update_rate)
    out = []
    for _ in range(STEPS):
        result = model(ids_BT[:, :-1], return_routing=True)
        ce = torch.nn.functional.cross_entropy(result.logits.flatten(0, 1), ids_BT[:, 1:].flatten())
        loss = ce + result.aux_loss
        optimizer.zero_grad()
        loss.backward()
        if sync is not None:
            sync(model)
        optimizer.step()
        balancer.step()
        out.append(torch.stack([loss.detach(), result.aux_loss.detach()]))
    return torch.stack(out)


def _batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def _rank(rank: int, world: int, port: int, case: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model(case)
        parallelize_experts(model)
        share = BATCH // world
        history = _train(model, _batch()[rank * share : (rank + 1) * share], sync_gradients)
        dist.all_reduce(history)  # the mean over ranks: the global batch's loss
        experts = {
            f"{i}.{n}": p.detach().clone()
            for i, b in model.moe_blocks().items()
            for n, p in b.experts.named_parameters()
        }
        biases = {
            i: b.router.selection_bias_E for i, b in model.moe_blocks().items() if b.router.selection_bias_E is not None
        }
        torch.save(
            {
                "history": history / world,
                "experts": experts,
                "first": model.layers[0].mlp.experts.first,
                "biases": biases,
                "router": model.layers[1].mlp.router.weight.detach().clone(),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_train_as_one_process(case, world):
    reference = _model(case)
    history = _train(reference, _batch())
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, _free_port(), case, tmp), nprocs=world)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    assert _rel(ranks[0]["history"], history) < 1e-5
    for r in ranks:
        assert torch.equal(r["history"], ranks[0]["history"])
        assert _rel(r["router"], reference.layers[1].mlp.router.weight.detach()) < 1e-5
        for i, bias in r["biases"].items():
            assert _rel(bias, reference.moe_blocks()[i].router.selection_bias_E) < 1e-5
    local = 8 // world
    for r, shard in enumerate(ranks):  # each rank's experts: its slice of the one-process model's, trained alike
        assert shard["first"] == r * local
        for name, p in shard["experts"].items():
            layer, param = name.split(".", 1)
            full = getattr(reference.moe_blocks()[int(layer)].experts, param)[r * local : (r + 1) * local]
            assert _rel(p, full.detach()) < 1e-5, name


def test_sharded_experts_are_their_slice():
    model = _model("top1+aux")
    experts = model.layers[0].mlp.experts
    shard = ShardedExperts(experts, 4, 2)
    assert shard.num_experts == 2 and shard.total == 8
    assert torch.equal(shard.gate_up_proj, experts.gate_up_proj[4:6])
