"""`moekit place`: where each expert (and each redundant copy of a hot one) goes under expert parallelism, from a
run's measured loads (DeepSeek's EPLB), with max/mean tokens per GPU before and after."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def measured_loads(run: Path) -> tuple[dict[str, list[int]], str]:
    """({layer: tokens per expert}, where they come from) of a run directory: its last validation's loads (the
    trained model on held-out text), else the sum over its logged training steps."""
    metrics = run / "metrics.jsonl" if run.is_dir() else run
    if not metrics.is_file():
        raise ValueError(f"{run}: no metrics.jsonl (allowed a moekit train run directory or its metrics.jsonl)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("layers")]
    if not records:
        raise ValueError(f"{metrics}: no expert loads logged")
    validations = [r for r in records if "val_loss" in r]
    if validations:
        last = validations[-1]
        return {k: v["tokens_per_expert"] for k, v in last["layers"].items()}, f"validation at step {last['step']}"
    total: dict[str, list[int]] = {}
    for r in records:
        for k, v in r["layers"].items():
            total[k] = [a + b for a, b in zip(total.get(k, [0] * len(v)), v["tokens_per_expert"], strict=True)]
    return total, f"{len(records)} logged training steps"


def _groups(run: Path) -> int:
    config = (run if run.is_dir() else run.parent) / "run.json"
    if not config.is_file():
        return 1
    routing = (json.loads(config.read_text()).get("model", {}).get("moe") or {}).get("routing") or {}
    return int(routing.get("n_group") or 1)


def run(args: argparse.Namespace) -> int:
    from moekit.distributed.eplb import contiguous_loads, place_experts

    path = Path(args.run)
    loads, source = measured_loads(path)
    layers = sorted(loads, key=int)
    w = torch.tensor([loads[k] for k in layers], dtype=torch.float64)
    experts = w.shape[1]
    groups = args.groups or _groups(path)
    if experts % args.gpus:
        raise ValueError(f"{experts} experts do not split over --gpus {args.gpus}: allowed a divisor")
    placement = place_experts(w, experts + args.redundant, groups, args.nodes, args.gpus)
    before, after = contiguous_loads(w, args.gpus), placement.gpu_loads(w, args.gpus)
    ratio = lambda t: (t.max(-1).values / t.mean(-1)).tolist()  # noqa: E731
    rows = [
        {
            "layer": int(k),
            "max_over_mean_before": b,
            "max_over_mean_after": a,
            "physical_to_logical": placement.physical_to_logical[i].tolist(),
            "copies": placement.copies[i].tolist(),
        }
        for i, (k, b, a) in enumerate(zip(layers, ratio(before), ratio(after), strict=True))
    ]
    hierarchical = groups % args.nodes == 0
    summary = {
        "loads": source,
        "experts": experts,
        "slots": experts + args.redundant,
        "gpus": args.gpus,
        "nodes": args.nodes,
        "groups": groups,
        "policy": "hierarchical" if hierarchical else "global",
        "layers": rows,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"loads    {path}: {source}, {len(layers)} MoE layer(s) of {experts} experts")
    print(
        f"layout   {experts} experts + {args.redundant} copies on {args.gpus} GPUs of {args.nodes} node(s), "
        f"{groups} group(s): {summary['policy']} EPLB"
    )
    print("layer  max/mean tokens per GPU: before  after  copied experts")
    for r in rows:
        copied = ", ".join(f"{e} x{c}" for e, c in enumerate(r["copies"]) if c > 1) or "none"
        print(f"{r['layer']:<6} {r['max_over_mean_before']:>31.2f}  {r['max_over_mean_after']:>5.2f}  {copied}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "place",
        help="place experts and redundant copies over GPUs from a run's measured loads (DeepSeek's EPLB)",
        description="Expert placement for expert parallelism: from the expert loads a moekit train run measured "
        "(its last validation, else its training steps), copies of the hottest experts and a packing of all "
        "copies onto GPUs that evens their loads (DeepSeek's EPLB: hierarchical over nodes where the routing "
        "groups divide over them). Prints max/mean tokens per GPU before (experts in order, one copy each) and "
        "after.",
    )
    p.add_argument("run", help="a moekit train run directory (or its metrics.jsonl)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) the experts are spread over")
    p.add_argument("--redundant", type=int, default=0, help="extra expert copies in all (a multiple of --gpus)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are on (1)")
    p.add_argument("--groups", type=int, help="expert groups of the routing (default: the run's n_group)")
    p.add_argument("--json", action="store_true", help="the placement and ratios as JSON")
    p.set_defaults(fn=run)
