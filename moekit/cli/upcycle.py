"""`moekit upcycle`: a dense checkpoint turned into an MoE that starts out computing the same."""

from __future__ import annotations

import argparse
import json

import moekit


def run(args: argparse.Namespace) -> int:
    from moekit.model.count import count_parameters
    from moekit.train.upcycle import upcycle

    dense = moekit.from_pretrained(args.dense, dtype="float32")
    model = upcycle(
        dense,
        args.experts,
        args.top_k,
        args.granularity,
        drop_ratio=args.drop_ratio,
        seed=args.seed,
        bias_update_rate=args.bias_update_rate,
        aux_loss_coef=args.aux_loss_coef,
    )
    moekit.save_pretrained(model, args.out)
    n_dense, n = count_parameters(dense), count_parameters(model)
    report = {
        "out": args.out,
        "routing": model.config.moe.describe(),
        "moe_layers": list(model.config.moe_layers),
        "dense_params": n_dense["total"],
        "total_params": n["total"],
        "active_params": n["active"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"routing  {report['routing']} in layers {report['moe_layers']}")
        total, active = n["total"] / 1e6, n["active"] / 1e6
        print(f"params   {n_dense['total'] / 1e6:.2f}M dense -> {total:.2f}M total, {active:.2f}M active")
        print(f"wrote    {args.out}   (continue with: moekit train --init {args.out} --out RUN)")
    return 0


def add_parser(sub) -> None:
    u = sub.add_parser(
        "upcycle",
        help="turn a dense checkpoint into an MoE that starts out computing exactly the same",
        description="Sparse upcycling: each dense FFN becomes EXPERTS experts copied from it (with --granularity G, "
        "G slices of it, routed as whole copies and scaled by G), so the MoE reproduces the dense model at "
        "initialisation; --drop-ratio re-initialises part of each expert (drop-upcycling).",
    )
    u.add_argument("dense", help="dense model directory (config.json + safetensors), e.g. RUN/final")
    u.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    u.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    u.add_argument("--granularity", type=int, default=1, help="slices per dense FFN (default 1: whole copies)")
    u.add_argument("--drop-ratio", type=float, default=0.0, help="drop-upcycling ratio (default 0: exact)")
    u.add_argument("--bias-update-rate", type=float, default=0.0, help="loss-free balancing rate u (default 0)")
    u.add_argument("--aux-loss-coef", type=float, default=0.0, help="Switch aux loss alpha (default 0)")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--out", required=True, help="where to write the MoE model directory")
    u.add_argument("--json", action="store_true")
    u.set_defaults(fn=run)
