"""`moekit report`: plots and a JSON summary of a training run."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from moekit.train.report import render_report

    summary = render_report(args.run_dir, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"steps    {summary['steps']}: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
    if "val_loss" in summary:
        print(f"val      {summary['val_loss']:.3f} (best {summary['best_val_loss']:.3f})")
        print(f"MaxVio   batch {summary['max_vio_last']:.3f}, global {summary['max_vio_global']:.3f}")
        for layer, s in summary["layers"].items():
            print(
                f"layer {layer:>2} MaxVio {s['max_vio']:.3f}, entropy {s['entropy']:.3f}, "
                f"{s['dead_experts']} dead expert(s)"
            )
    for f in summary["files"]:
        print(f"wrote    {f}")
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser(
        "report",
        help="plots and a JSON summary of a training run",
        description="Render a training run's loss curves, per-layer expert-load heatmaps over time and expert "
        "co-activation to PNG (matplotlib), plus summary.json.",
    )
    r.add_argument("run_dir", help="the --out directory of `moekit train`")
    r.add_argument("--out", help="where to write (default RUN_DIR/report)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(fn=run)
