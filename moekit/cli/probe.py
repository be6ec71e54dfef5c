"""`moekit probe`: per-layer routing statistics of a scaled-down published model on real text."""

from __future__ import annotations

import argparse
import json

import moekit
from moekit.experts.backends import BACKENDS, MATMULS


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.config.scaled import scaled_down
    from moekit.model.probe import probe_routing
    from moekit.train.data import is_validation, read_texts, stdlib_files, token_batches

    torch.manual_seed(args.seed)
    cfg = scaled_down(args.model, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads)
    model = moekit.from_config(cfg)
    if args.backend or args.matmul != "auto":
        model.set_backend(args.backend or "auto", args.matmul)
    if args.data:
        from pathlib import Path

        path = Path(args.data)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    else:
        files = [f for f in stdlib_files() if not is_validation(f)]
    text = read_texts(files, args.batch * args.seq_len * 2)
    report = probe_routing(model, token_batches(text, args.batch, args.seq_len))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    p = report["params"]
    print(f"model    {report['model']}")
    print(f"routing  {report['routing']}")
    print(f"params   {p['total'] / 1e6:.2f}M total, {p['active'] / 1e6:.2f}M active per token")
    print(
        f"text     {report['tokens']} byte tokens of {'the Python standard library' if not args.data else args.data}"
        f" ({report['tokens_per_s']:.0f} tokens/s, loss {report['loss']:.3f} at random init)"
    )
    print(
        f"\n{'layer':>5} {'min':>6} {'mean':>7} {'max':>6} {'MaxVio':>7} {'entropy':>8} {'CV':>6} {'dead':>5}"
        f" {'dropped':>8}"
    )
    for layer, s in report["layers"].items():
        t = s["tokens_per_expert"]
        print(
            f"{layer:>5} {min(t):>6} {sum(t) / len(t):>7.1f} {max(t):>6} {s['max_vio']:>7.3f} {s['entropy']:>8.3f}"
            f" {s['cv']:>6.3f} {s['dead_experts']:>5} {s['dropped_fraction']:>8.2%}"
        )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="run real text through a scaled-down published MoE and print per-layer routing",
        description="Build a scaled-down copy of a published MoE (its routing, experts and layer pattern, "
        "small widths), run byte tokens of real text through it, and print each MoE layer's expert load.",
    )
    p.add_argument(
        "--model", default="deepseek-v3", help="published config name or config.json path (default: deepseek-v3)"
    )
    p.add_argument("--hidden", type=int, default=256, help="model width D (default 256)")
    p.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--batch", type=int, default=8, help="sequences (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--data", help="a text file or directory (default: the Python standard library's source)")
    p.add_argument("--backend", choices=sorted(BACKENDS), help="experts backend (default: the fast one)")
    p.add_argument(
        "--matmul", choices=list(MATMULS), default="auto", help="the grouped backend's matmul (default auto)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(fn=run)
