"""`moekit plan`: what serving a model needs and costs."""

from __future__ import annotations

import argparse
import json

from moekit.cli.format import gb


def run(args: argparse.Namespace) -> int:
    from moekit.plan import plan

    r = plan(
        args.model,
        hardware=args.hardware,
        gpus=args.gpus,
        weights=args.weights,
        kv=args.kv,
        context=args.context,
        concurrency=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        gpu_hour_usd=args.gpu_hour_usd,
        utilisation=args.utilisation,
        api_usd_per_mtok=args.api_usd_per_mtok,
        bandwidth_efficiency=args.bandwidth_efficiency,
        compute_efficiency=args.compute_efficiency,
        reserve=args.reserve,
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    m, p, g, dec, pre, c = r["model"], r["params"], r["gpus"], r["decode"], r["prefill"], r["cost"]
    rows = [
        (
            "model",
            f"{m['name']} ({m['family']}): {m['layers']} layers, {m['moe_layers']} MoE, {m['experts']} experts "
            f"top-{m['top_k']}" + (f" + {m['shared_experts']} shared" if m["shared_experts"] else ""),
        ),
        ("attention", m["attention"]),
        (
            "params",
            f"{p['total'] / 1e9:.2f}B total, {p['active'] / 1e9:.2f}B active "
            f"({p['active_without_embeddings'] / 1e9:.2f}B without embedding and head)",
        ),
        ("weights", f"{r['weights']['precision']}: {gb(r['weights']['bytes']['total'])}"),
        (
            "KV cache",
            f"{r['kv_cache']['bytes_per_token']:,} bytes/token at {r['kv_cache']['precision']}; "
            f"{gb(r['kv_cache']['bytes_total'])} for {r['kv_cache']['concurrency']} x "
            f"{r['kv_cache']['context']} tokens",
        ),
        (
            "GPUs",
            f"{g['count']} x {g['hardware']} on {g['nodes']} node(s), {r['memory']['used_fraction']:.0%} of "
            f"usable memory; {g['parallelism']}",
        ),
        (
            "decode",
            f"{dec['tokens_per_s_per_sequence']:.1f} tok/s per sequence, {dec['aggregate_tokens_per_s']:.1f} "
            f"tok/s aggregate ({dec['bound']}-bound; ceiling {dec['ceiling_tokens_per_s_per_sequence']:.1f})",
        ),
        (
            "prefill",
            f"{pre['prompt_tokens']} tokens in {pre['time_to_first_token_s']:.2f} s "
            f"({pre['tokens_per_s']:,.0f} tok/s, {pre['bound']}-bound)",
        ),
    ]
    if c.get("gpu_hour_usd") is not None:
        rows.append(
            (
                "cost",
                f"${c['usd_per_mtok_output']:.3f} per M output tokens, ${c['usd_per_mtok_input']:.3f} "
                f"per M input; ${c['monthly_usd']:,.0f}/month for {c['capacity_mtok_per_month']:,.0f}M tokens",
            )
        )
        if "break_even_mtok_per_month" in c:
            rows.append(
                (
                    "vs API",
                    f"break-even at {c['break_even_mtok_per_month']:,.0f}M tokens/month "
                    f"(API ${c['api_usd_per_mtok']:g}/M)",
                )
            )
    rows.append(("profile", c["profile"]))
    for label, text in rows:
        print(f"{label:<10} {text}")
    if "recommendation" in r:
        print(f"\nrecommended: {g['count']} x {g['hardware']} ({r['recommendation']['why']}); next best:")
        for alt in r["recommendation"]["alternatives"]:
            print(
                f"  {alt['gpus']:>3} x {alt['hardware']:<10} {alt['tokens_per_s_per_sequence']:>7.1f} tok/s/seq  "
                f"${alt['usd_per_mtok_output']:.3f}/M out"
            )
    print("\nhow:")
    for line in r["explain"] + [f"assumed: {a}" for a in r["model"]["assumptions"]]:
        print(f"  - {line}")
    return 0


def add_parser(sub) -> None:
    pl = sub.add_parser(
        "plan",
        help="memory, GPUs, decode/prefill speed and cost of serving an MoE",
        description="Plan a deployment from a model's config: parameters, weight and KV-cache memory, GPUs and "
        "parallelism, roofline decode and prefill speed, $ per million tokens and break-even against an API.",
    )
    pl.add_argument("model", help="published name (see `moekit models`), config.json path or model directory")
    pl.add_argument("--hardware", help="GPU kind from the catalog or a JSON/TOML spec file (default: recommend)")
    pl.add_argument("--gpus", type=int, help="GPU count (default: the fewest that fit)")
    pl.add_argument(
        "--weights",
        help="PREC or experts=PREC,rest=PREC (bf16, fp8, int8, int4, mxfp4, q8_0, q4_k_m, q4_0, q8, q4, ...; "
        "default: what the checkpoint stores, measured from its files or read from its quantization_config, else bf16)",
    )
    pl.add_argument("--kv", default="bf16", help="KV-cache precision (default bf16)")
    pl.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    pl.add_argument("--concurrency", type=int, default=1, help="sequences decoded together (default 1)")
    pl.add_argument("--prompt-tokens", type=int, help="prompt length for time to first token (default: context)")
    pl.add_argument("--gpu-hour-usd", type=float, help="price per GPU-hour (default: the catalog's typical price)")
    pl.add_argument("--utilisation", type=float, default=0.5, help="fraction of time serving (default 0.5)")
    pl.add_argument("--api-usd-per-mtok", type=float, help="an API's price per million tokens, for break-even")
    pl.add_argument("--bandwidth-efficiency", type=float, default=0.7, help="fraction of peak bandwidth (0.7)")
    pl.add_argument("--compute-efficiency", type=float, default=0.5, help="fraction of peak FLOPs (0.5)")
    pl.add_argument("--reserve", type=float, default=0.1, help="memory fraction kept for runtime (0.1)")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(fn=run)
