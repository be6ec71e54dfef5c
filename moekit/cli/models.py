"""`moekit models`: the published configs moekit ships."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from moekit.config.published import load_hf_config, published_names
    from moekit.families import moe_from_hf

    rows = []
    for name in published_names():
        moe, layers, _ = moe_from_hf(load_hf_config(name))
        rows.append(
            {"name": name, "moe_layers": len(layers), "routing": moe.describe(), "experts": moe.layout.describe()}
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<24} {r['moe_layers']:>3} MoE layers  {r['routing']}; experts {r['experts']}")
    return 0


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list the published MoE configs moekit ships, with their routing")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=run)
