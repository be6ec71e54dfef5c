"""`moekit inspect`: what a model is (layers, routing, attention, parameters, bytes, KV cache)."""

from __future__ import annotations

import argparse
import json

from moekit.cli.format import count, gb


def run(args: argparse.Namespace) -> int:
    from moekit.model.count import PARTS
    from moekit.plan.inspect import inspect_model

    r = inspect_model(args.model)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    p = r["params"]
    dense = f", dense layers {r['dense_layers']}" if r["dense_layers"] else ""
    rows = [
        ("model", f"{r['name']} ({r['family']})"),
        (
            "layers",
            f"{r['layers']} ({len(r['moe_layers'])} MoE{dense}), D={r['hidden_size']}, vocab {r['vocab_size']}"
            + (f", {r['mtp_layers']} multi-token-prediction layer(s)" if r["mtp_layers"] else "")
            + (f", experts of layers {r['table_layers']} picked by a token-id table" if r["table_layers"] else "")
            + (f", {r['hyper_streams']} hyper-connected residual streams" if r["hyper_streams"] > 1 else ""),
        ),
        ("experts", f"{r['experts']} routed, top-{r['top_k']}, {r['shared_experts']} shared; {r['experts_layout']}"),
        ("routing", r["routing"]),
        ("attention", f"{r['attention']}; {r['heads']['query']} query / {r['heads']['key_value']} KV heads"),
        (
            "params",
            f"{p['total']:,} total, {p['active']:,} active "
            f"({p['active_without_embeddings']:,} without embedding and head)",
        ),
        (
            "parts",
            ", ".join(f"{k} {count(p[k])}" for k in PARTS if p[k]) + (f", mtp {count(p['mtp'])}" if p["mtp"] else ""),
        ),
        ("bytes", ", ".join(f"{k} {gb(r['weight_bytes'][k])}" for k in ("fp32", "bf16", "fp8", "mxfp4", "q4_k_m"))),
        ("KV cache", f"{r['kv_cache_bytes_per_token_bf16']:,} bytes per token (bf16)" + _state(r)),
    ]
    if r["stored"]:
        quantized = ", ".join(r["stored"]["quantized"]) or "none"
        rows.insert(-1, ("stored", f"{gb(r['stored']['bytes'])} in the files; quantized: {quantized}"))
    for label, text in rows + [("assumed", a) for a in r["assumptions"]]:
        print(f"{label:<10} {text}")
    return 0


def _state(r: dict) -> str:
    """The recurrent layers' state, once per sequence whatever its length."""
    state = r["recurrent_state_bytes_per_sequence_bf16"]
    return f" + {state:,} bytes of recurrent state per sequence" if state else ""


def add_parser(sub) -> None:
    ins = sub.add_parser(
        "inspect",
        help="what a model is: layers, routing, attention, parameters, bytes, KV cache",
        description="Describe a model from its config: family, which layers are MoE, experts and top-k, the routing "
        "spec in words, attention type, total and active parameters, bytes per dtype, KV-cache bytes per token.",
    )
    ins.add_argument("model", help="published name, config.json path or model directory")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(fn=run)
