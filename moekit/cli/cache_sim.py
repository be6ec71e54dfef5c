"""`moekit cache-sim`: replay a routing trace against expert-cache policies and Belady's optimum."""

from __future__ import annotations

import argparse
import json


def slots_of(budget: str, expert_bytes: int) -> int:
    """Expert slots in a budget given as bytes with a unit (8GB, 512MiB) or as a count of experts (16)."""
    from moekit._validate import parse_bytes

    n, unit = parse_bytes("--budget", budget, "experts")
    return int(n) if unit else int(n // expert_bytes)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moekit.infer.expert_trace import POLICIES, ExpertTrace, simulate

    trace = ExpertTrace.load(Path(args.trace))
    slots = slots_of(args.budget, trace.expert_bytes)
    policies = args.policies or POLICIES
    results = [simulate(trace, slots, policy, args.half_life) for policy in policies]
    if args.prefetch:  # the online policies again, each layer's predicted experts read ahead
        for policy in (p for p in policies if p != "belady"):
            result = simulate(trace, slots, policy, args.half_life, prefetch=True)
            results.append({**result, "policy": f"{policy}+prefetch"})
    best = next((r["hit_rate"] for r in results if r["policy"] == "belady"), None)
    for r in results:
        r["of_belady"] = r["hit_rate"] / best if best else None
    total = len(trace.layers) * trace.experts
    if args.json:
        print(json.dumps({"trace": args.trace, "slots": slots, "experts": total, "policies": results}, indent=2))
        return 0
    print(
        f"trace    {args.trace}: {trace.ids.shape[0]:,} tokens, {len(trace.layers)} MoE layers x {trace.experts} "
        f"experts, top-{trace.ids.shape[2]}"
    )
    print(f"budget   {slots} expert slots of {total} ({slots / total:.0%}), {trace.expert_bytes / 2**20:.2f} MiB each")
    print("policy              hit rate  of Belady  MiB read per token  prefetched reads wasted")
    for r in results:
        of = f"{r['of_belady']:.1%}" if r["of_belady"] is not None else "-"
        waste = f"{r['prefetch_wasted'] / max(r['prefetched'], 1):.1%}" if "prefetched" in r else "-"
        print(f"{r['policy']:<19} {r['hit_rate']:>8.1%}  {of:>9}  {r['bytes_per_token'] / 2**20:>18.2f}  {waste:>23}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "cache-sim",
        help="replay a routing trace against expert-cache policies and Belady's optimum",
        description="How often a pool of expert slots (shared by all MoE layers) already holds the experts each "
        "token needs, under LRU, LFU, LFU with decay (recent use counts more) and Belady's optimum (the offline "
        "best, which knows the future), from a trace written by moekit trace.",
    )
    p.add_argument("trace", help="a trace written by moekit trace")
    p.add_argument("--budget", required=True, help="expert memory: bytes (8GB, 512MiB) or a count of experts (16)")
    p.add_argument("--policies", nargs="+", choices=["lru", "lfu", "lfu-decay", "belady"], help="(all)")
    p.add_argument("--half-life", type=float, default=64.0, help="lfu-decay: tokens for a use to count half (64)")
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="also each online policy with the next layer's predicted experts read ahead (the trace's early router)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=run)
