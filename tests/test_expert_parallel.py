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
from moekit.distributed.training import ExpertParallelRun
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
    # capacity 1.0 drops a share of the assignments, by position over the whole batch
    "capacity+drops": dict(routing=RoutingSpec(num_experts=8, top_k=2, normalize=True), capacity_factor=1.0),
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


def _rank(rank: int, world: int, port: int, case: str, out_dir: str, ep: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model(case)
        if ep == world:  # the parts alone
            parallelize_experts(model)
            sync = sync_gradients
        else:  # data parallel x expert parallel, as moekit train --ep runs it
            run = ExpertParallelRun(ep)
            run.prepare(model, BATCH)
            sync = lambda m: run.finish_gradients(m, float("inf"))  # noqa: E731
        share = BATCH // world
        history = _train(model, _batch()[rank * share : (rank + 1) * share], sync)
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
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    else:
        code = 0
    dist.destroy_process_group()
    os._exit(code)  # past gloo's threads at interpreter exit (see moekit.distributed.launch.finish)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


LAYOUTS = [(c, 2, 2) for c in CASES] + [("groups+shared+bias", 4, 4), ("top1+aux", 4, 2), ("capacity+drops", 4, 2)]


@pytest.mark.parametrize("case,world,ep", LAYOUTS)
def test_ranks_train_as_one_process(case, world, ep):
    """world processes, experts over ep of them (world / ep data-parallel replicas of each share)."""
    reference = _model(case)
    history = _train(reference, _batch())
    if "capacity" in case:  # the capacity does drop assignments
        assert sum(i.dropped for i in reference(_batch()[:, :-1], return_routing=True).moe.values()) > 0
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, _free_port(), case, tmp, ep), nprocs=world)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    assert _rel(ranks[0]["history"], history) < 1e-5
    for r in ranks:
        assert torch.equal(r["history"], ranks[0]["history"])
        assert _rel(r["router"], reference.layers[1].mlp.router.weight.detach()) < 1e-5
        for i, bias in r["biases"].items():
            assert _rel(bias, reference.moe_blocks()[i].router.selection_bias_E) < 1e-5
    local = 8 // ep
    for r, shard in enumerate(ranks):  # each rank's experts: its slice of the one-process model's, trained alike
        first = (r % ep) * local
        assert shard["first"] == first
        for name, p in shard["experts"].items():
            layer, param = name.split(".", 1)
            full = getattr(reference.moe_blocks()[int(layer)].experts, param)[first : first + local]
            assert _rel(p, full.detach()) < 1e-5, name


def test_sharded_experts_are_their_slice():
    model = _model("top1+aux")
    experts = model.layers[0].mlp.experts
    shard = ShardedExperts(experts, 4, 2)
    assert shard.num_experts == 2 and shard.total == 8
    assert torch.equal(shard.gate_up_proj, experts.gate_up_proj[4:6])


def _losses(run: Path) -> list[float]:
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] if "loss" in r else r["val_loss"] for r in rows]


def _train_cli(run: Path, processes: int, *extra: str, ep: int | None = None) -> None:
    """moekit train on the tiny preset for 6 steps (a checkpoint and a validation at step 3), in one process or
    under torchrun with --ep (default: every process)."""
    import subprocess
    import sys

    flags = ["--out", str(run), "--steps", "6", "--save-every", "3", "--eval-every", "3", "--batch-size", "4"]
    flags += ["--seq-len", "32", "--json", *extra]
    launch = [sys.executable, "-m", "moekit", "train"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
        launch += [f"--master-port={_free_port()}", "-m", "moekit", "train", "--ep", str(ep or processes)]
    done = subprocess.run([*launch, *flags], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_train_cli_under_torchrun_resumes_at_other_ep_sizes(tmp_path):
    """moekit train --ep 2 under torchrun: one process's losses, validation and final model; its checkpoint at
    step 3 (gathered) resumes in one process, at --ep 4, and at --ep 2 in 4 processes (2 data-parallel replicas)
    on the same loss curve."""
    from safetensors.torch import load_file

    _train_cli(tmp_path / "one", 1)
    _train_cli(tmp_path / "ep2", 2)
    reference = _losses(tmp_path / "one")
    assert _rel(torch.tensor(_losses(tmp_path / "ep2")), torch.tensor(reference)) < 1e-5
    one, ep2 = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("one", "ep2"))
    assert sorted(one) == sorted(ep2) and all(_rel(ep2[k], one[k]) < 1e-5 for k in one)
    for processes, ep in ((1, None), (4, 4), (4, 2)):  # 4 processes: all expert parallel, or 2 x 2 with 2 replicas
        run = tmp_path / f"resumed{processes}-{ep}"
        (run / "checkpoints").mkdir(parents=True)
        for f in ("run.json", "metrics.jsonl"):
            (run / f).write_bytes((tmp_path / "ep2" / f).read_bytes())
        step3 = tmp_path / "ep2" / "checkpoints" / "step-00000003"
        (run / "checkpoints" / step3.name).mkdir()
        for f in step3.iterdir():
            (run / "checkpoints" / step3.name / f.name).write_bytes(f.read_bytes())
        _train_cli(run, processes, "--resume", ep=ep)
        assert _rel(torch.tensor(_losses(run)), torch.tensor(reference)) < 1e-5


def _worker(torchrun_pid: int, local_rank: int) -> int:
    """The pid of torchrun's worker of that local rank (from the workers' environment)."""
    for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        if f"LOCAL_RANK={local_rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"no worker of local rank {local_rank}")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_stops_the_others_with_its_name(fault, tmp_path):
    """Rank 1 killed, or stopped (hung), in the middle of training: rank 0 stops within the timeout (5 s here) plus
    the check, and the message names rank 1 (torchrun's report for a death, moekit's one line for a hang)."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}"]
    command += ["-m", "moekit", "train", "--ep", "2", "--out", str(run), "--steps", "100000", "--batch-size", "4"]
    command += ["--seq-len", "32", "--json", "--dist-timeout", "5", "--save-every", "100000", "--eval-every", "100000"]
    launched = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline and launched.poll() is None, "training did not start"
            time.sleep(0.5)
        rank1 = _worker(launched.pid, 1)
        os.kill(rank1, getattr(signal, fault))
        stopped = time.monotonic()
        if fault == "SIGKILL":
            _, err = launched.communicate(timeout=60)
            assert "rank      : 1" in err and "SIGKILL" in err
        else:
            lines = []
            for line in launched.stderr:
                lines.append(line)
                if "moekit train: error" in line:
                    break
            assert "rank(s) 1 did not answer" in lines[-1], "".join(lines[-20:])
        assert time.monotonic() - stopped < 30
    finally:
        if launched.poll() is None:  # the workers first: torchrun waits for a stopped one
            children = Path(f"/proc/{launched.pid}/task/{launched.pid}/children").read_text().split()
            for pid in (*map(int, children), launched.pid):
                os.kill(pid, signal.SIGKILL)
        launched.wait()


def _namespaces(tag: str) -> list[tuple[str, str, str]] | None:
    """Two network namespaces joined by a veth pair: [(namespace, interface, address)], or None where this
    machine cannot make them (not root, no `ip`, no namespaces)."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("ip") is None:
        return None
    hosts = [(f"moekit-{tag}-{h}", f"mk{tag}{h}", f"10.78.{os.getpid() % 250}.{i + 1}") for i, h in enumerate("ab")]
    (a, va, _), (b, vb, _) = hosts
    steps = [["netns", "add", a], ["netns", "add", b], ["link", "add", va, "type", "veth", "peer", "name", vb]]
    steps += [["link", "set", va, "netns", a], ["link", "set", vb, "netns", b]]
    for ns, dev, addr in hosts:
        steps += [["-n", ns, "addr", "add", f"{addr}/24", "dev", dev], ["-n", ns, "link", "set", dev, "up"]]
        steps += [["-n", ns, "link", "set", "lo", "up"]]
    for step in steps:
        if subprocess.run(["ip", *step], capture_output=True).returncode != 0:
            _drop_namespaces(hosts)
            return None
    return hosts


def _drop_namespaces(hosts) -> None:
    import subprocess

    for ns, _, _ in hosts:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.slow
def test_two_hosts_by_c10d_rendezvous_train_as_one_process(tmp_path):
    """Two "hosts" (network namespaces on a veth pair), torchrun's c10d rendezvous between them, 2 x 2 processes
    with --ep 4: one process's losses."""
    import subprocess
    import sys

    hosts = _namespaces(str(os.getpid() % 10000))
    if hosts is None:
        pytest.skip("network namespaces need root and iproute2")
    try:
        endpoint = f"{hosts[0][2]}:{_free_port()}"
        flags = ["--steps", "6", "--save-every", "3", "--eval-every", "3", "--batch-size", "4", "--seq-len", "32"]
        launched = []
        for i, (ns, dev, addr) in enumerate(hosts):
            command = ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={dev}", sys.executable, "-m"]
            command += ["torch.distributed.run", "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d"]
            command += [f"--rdzv-endpoint={endpoint}", "--rdzv-id=moekit", f"--rdzv-conf=is_host={i == 0}"]
            command += [f"--local-addr={addr}", "-m", "moekit", "train", "--ep", "4", "--out", str(tmp_path / "run")]
            launched.append(
                subprocess.Popen(
                    [*command, *flags, "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                )
            )
        for p in launched:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
    finally:
        _drop_namespaces(hosts)
    _train_cli(tmp_path / "one", 1)
    assert _rel(torch.tensor(_losses(tmp_path / "run")), torch.tensor(_losses(tmp_path / "one"))) < 1e-5


@pytest.mark.slow
def test_generate_under_torchrun_gives_one_process_tokens(tmp_path):
    """moekit generate --ep 2: the tokens of one process (greedy; each rank holds half of the experts)."""
    import json
    import subprocess
    import sys

    model = _model("groups+shared+bias").eval()  # random weights: a varied greedy continuation
    moekit.save_pretrained(model, tmp_path / "model")
    command = ["-m", "moekit", "generate", str(tmp_path / "model"), "def f(x):", "--max-new-tokens", "16", "--json"]
    one = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}"]
    two = subprocess.run([*launch, *command, "--ep", "2"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-8000:]
    tokens = json.loads(one.stdout)["tokens"]
    assert len(set(tokens)) > 3 and json.loads(two.stdout)["tokens"] == tokens


class _Shares:
    """Ranks' shares of one batch in one process: all_gather returns every share's tensor, given in advance."""

    def __init__(self, rank: int, ranks: int, gathered: list):
        self.rank, self.ranks, self.gathered = rank, ranks, gathered

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.gathered[self.rank] = t
        return torch.stack(self.gathered)


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_capacity_over_shares_drops_what_one_process_drops(ranks, factor):
    """Each rank's share of a batch keeps exactly the assignments one process keeps of the whole batch."""
    from moekit.routing.balancing import apply_capacity
    from moekit.routing.plan import RoutingPlan

    generator = torch.Generator().manual_seed(ranks * 10 + int(factor * 4))
    tokens, k, e = 32, 2, 8
    scores = torch.rand(tokens, e, generator=generator) + torch.linspace(0, 1, e)  # skewed: the last experts overflow
    ids_TK = scores.topk(k, dim=-1).indices
    whole = apply_capacity(RoutingPlan.from_topk(ids_TK, torch.ones(tokens, k), e), factor)
    kept = {(int(t), int(x)) for t, x in zip(whole.token_ids_N, whole.expert_ids_N, strict=True)}
    share = tokens // ranks
    counts = [
        torch.bincount(
            RoutingPlan.from_topk(ids_TK[r * share : (r + 1) * share], torch.ones(share, k), e).slot_N * e
            + ids_TK[r * share : (r + 1) * share].flatten(),
            minlength=k * e,
        ).view(k, e)
        for r in range(ranks)
    ]
    shared = set()
    for r in range(ranks):
        plan = RoutingPlan.from_topk(ids_TK[r * share : (r + 1) * share], torch.ones(share, k), e)
        mine = apply_capacity(plan, factor, shares=_Shares(r, ranks, list(counts)))
        shared |= {(int(t) + r * share, int(x)) for t, x in zip(mine.token_ids_N, mine.expert_ids_N, strict=True)}
    assert shared == kept and whole.num_dropped > 0
