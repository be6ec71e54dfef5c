"""Expert parallelism on this machine: training steps of one MoE model at a fixed global batch in 1, 2 and 4
processes (torchrun, gloo), each process holding 1/P of the experts and of the batch. Per process count: tokens/s
(the whole batch's, and per process), the forward's time in all-to-all, and the bytes each rank sent to the
others per step against what moekit's planner predicts for that layout (moekit.plan.roofline.expert_parallel_bytes:
even routing, the forward's exchange and the backward's, fp32 rows). A new random global batch every step; the
round of median step time of interleaved rounds is reported. torchrun gives each process one thread.

    python benchmarks/ep.py [--processes 1 2 4] [--steps 8] [--rounds 3] [--json results.json] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

BATCH, SEQ = 16, 128
MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, vocab_size=256)
MOE = dict(num_experts=16, top_k=2, expert_hidden=512)
TITLE = "4 layers, D=256, 16 experts top-2 (softmax), F=512; batch 16 x 128 tokens, fp32, SGD"


def _model():
    import moekit
    from moekit.config.model import ModelConfig
    from moekit.config.moe import MoEConfig
    from moekit.routing.spec import RoutingSpec

    torch.manual_seed(0)
    routing = RoutingSpec(num_experts=MOE["num_experts"], top_k=MOE["top_k"], normalize=True)
    moe = MoEConfig(routing=routing, expert_hidden=MOE["expert_hidden"], aux_loss_coef=0.01)
    return moekit.from_config(ModelConfig(**MODEL, moe=moe)).train()


def worker(steps: int, out: Path) -> None:
    """One rank's measurement (every rank of a torchrun launch, or the only process)."""
    import torch.distributed as dist

    from moekit.distributed.expert_parallel import parallelize_experts, sync_gradients

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    model = _model()
    if ranks > 1:
        dist.init_process_group("gloo")
        parallelize_experts(model)
    rank = dist.get_rank() if ranks > 1 else 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dispatchers = [b.dispatcher for b in model.moe_blocks().values()]
    times = []
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            for d in dispatchers:
                d.sent_bytes, d.seconds = 0, 0.0
        ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
        share = ids[rank * BATCH // ranks : (rank + 1) * BATCH // ranks]  # a new global batch every step
        start = time.perf_counter()
        result = model(share[:, :-1], return_routing=True)
        logits = result.logits.flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(logits, share[:, 1:].flatten()) + result.aux_loss
        optimizer.zero_grad()
        loss.backward()
        if ranks > 1:
            sync_gradients(model)
        optimizer.step()
        times.append(time.perf_counter() - start)
    sent = sum(getattr(d, "sent_bytes", 0) for d in dispatchers) / steps
    seconds = sum(getattr(d, "seconds", 0.0) for d in dispatchers) / steps
    record = {"step_s": statistics.median(times[2:]), "a2a_forward_s": seconds, "sent_bytes_forward": sent}
    out.with_name(f"{out.stem}.{rank}.json").write_text(json.dumps(record))
    if ranks > 1:
        dist.destroy_process_group()
        os._exit(0)  # past gloo's threads at interpreter exit (see moekit.distributed.launch.finish)


def measure(processes: int, steps: int, directory: Path) -> dict:
    out = directory / f"p{processes}"
    command = [__file__, "--worker", str(out), "--steps", str(steps)]
    if processes == 1:
        command = [sys.executable, *command]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={processes}",
            f"--master-port={port}",
            *command,
        ]
    subprocess.run(command, check=True, capture_output=True)
    ranks = [json.loads(out.with_name(f"{out.stem}.{r}.json").read_text()) for r in range(processes)]
    step = max(r["step_s"] for r in ranks)  # the step ends when the slowest rank does
    from moekit.plan.model_stats import model_stats
    from moekit.plan.roofline import expert_parallel_bytes

    predicted = 2 * expert_parallel_bytes(model_stats(_model().config), BATCH * SEQ, processes, activation_bytes=4)
    sent = 2 * statistics.mean(r["sent_bytes_forward"] for r in ranks)  # the backward sends as much again
    return {
        "processes": processes,
        "step_s": step,
        "tokens_per_s": BATCH * SEQ / step,
        "tokens_per_s_per_process": BATCH * SEQ / step / processes,
        "a2a_forward_s": statistics.mean(r["a2a_forward_s"] for r in ranks),
        "sent_bytes_per_rank": sent,
        "predicted_bytes_per_rank": predicted,
        "ranks": ranks,
    }


def print_table(report: dict, markdown: bool) -> None:
    print(f"{report['date']}, {report['machine']}: {report['model']}")
    header = "| processes | tok/s | tok/s per process | step ms | all-to-all ms (forward) | MB sent per rank per step "
    header += "| planned | sent / planned |"
    print(header if markdown else header.replace("|", " "))
    if markdown:
        print("|---" * 8 + "|")
    for r in report["rows"]:
        ratio = r["sent_bytes_per_rank"] / r["predicted_bytes_per_rank"] if r["predicted_bytes_per_rank"] else None
        cells = [
            str(r["processes"]),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s_per_process']:,.0f}",
            f"{1e3 * r['step_s']:.0f}",
            f"{1e3 * r['a2a_forward_s']:.1f}",
            f"{r['sent_bytes_per_rank'] / 1e6:.2f}",
            f"{r['predicted_bytes_per_rank'] / 1e6:.2f}",
            f"{ratio:.3f}" if ratio is not None else "-",
        ]
        print(("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round is reported")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--report", help="print the table of a results file written by --json, measuring nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, Path(args.worker))
        return
    if args.report:
        print_table(json.loads(Path(args.report).read_text()), args.markdown)
        return
    runs: dict[int, list[dict]] = {p: [] for p in args.processes}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):  # interleaved: this machine's speed drifts from minute to minute
            for p in args.processes:
                runs[p].append(measure(p, args.steps, Path(tmp)))
    rows = [
        {**min(r, key=lambda x: abs(x["step_s"] - statistics.median(y["step_s"] for y in r))), "rounds": r}
        for r in runs.values()
    ]  # the round of median step time
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "model": TITLE, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print_table(report, args.markdown)


if __name__ == "__main__":
    main()
