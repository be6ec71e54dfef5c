"""`moekit export-gguf`: a model directory written as one GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
import json
import sys

from moekit.cli.format import gb


def run(args: argparse.Namespace) -> int:
    from moekit.checkpoint.gguf_export import export_gguf

    def progress(done: int, total: int) -> None:
        if not args.json and sys.stderr.isatty():
            print(f"\rwriting tensors {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    report = export_gguf(args.model, args.out, args.type, progress)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    total = sum(s["bytes"] for s in report["storage"].values())
    print(f"{'storage':<8} {'tensors':>8} {'bytes':>10}")
    for name, s in report["storage"].items():
        print(f"{name:<8} {s['tensors']:>8} {gb(s['bytes']):>10}")
    print(
        f"wrote {args.out}: llama.cpp architecture {report['architecture']}, {gb(total)}, vocabulary: "
        f"{report['vocabulary']}"
    )
    return 0


def add_parser(sub) -> None:
    from moekit.checkpoint.gguf_export import TYPES

    e = sub.add_parser(
        "export-gguf",
        help="write a model as one GGUF file that llama.cpp runs (f32, f16, bf16, q8_0, q4_0, mxfp4)",
        description="Families: Mixtral (llama), Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 (deepseek2), GPT-OSS. "
        "Norms, biases, sinks and routers stay fp32; mxfp4 puts the routed experts in MXFP4 and the other matrices "
        "in q8_0. The vocabulary comes from tokenizer.json (BPE), moekit's byte tokenizer, or is left out (ids only).",
    )
    e.add_argument("model", help="model directory (config.json + safetensors) or a training run")
    e.add_argument("out", help="the .gguf file to write (must not exist)")
    e.add_argument("--type", default="f16", choices=TYPES, help="storage of the matrices (default f16)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(fn=run)
