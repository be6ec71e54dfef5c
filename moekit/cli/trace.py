"""`moekit trace`: record which routed experts a model's tokens ask for, layer by layer, on real text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    import torch

    import moekit
    from moekit.checkpoint.files import checkpoint_dir
    from moekit.infer.expert_trace import record_trace
    from moekit.infer.tokenizers import load_tokenizer
    from moekit.train.data import load_corpus

    if args.tokens < 1 or args.seq_len < 1:
        raise ValueError(f"--tokens {args.tokens} --seq-len {args.seq_len}: allowed positive counts")
    path = checkpoint_dir(args.model)
    model = moekit.from_pretrained(path, dtype="float32").eval()
    tokenizer = load_tokenizer(path, model.config.vocab_size)
    text, _, source = load_corpus(args.data or "", 8 * args.tokens + 4096, 0)
    ids = torch.tensor(tokenizer.encode(text)[: args.tokens], dtype=torch.long)
    rows = ids.numel() // args.seq_len
    if rows == 0:
        raise ValueError(f"{source}: fewer than --seq-len {args.seq_len} tokens of text")
    batches = list(ids[: rows * args.seq_len].view(rows, args.seq_len).split(8))
    trace = record_trace(model, batches, str(args.model))
    trace.save(Path(args.out))
    summary = {
        "trace": str(args.out),
        "data": source,
        "tokens": trace.ids.shape[0],
        "moe_layers": len(trace.layers),
        "experts": trace.experts,
        "top_k": trace.ids.shape[2],
        "expert_bytes": trace.expert_bytes,
        "early_prediction": trace.prediction_quality(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"trace    {args.out}: {summary['tokens']:,} tokens of {source}, {summary['moe_layers']} MoE layers x "
            f"{trace.experts} experts (top-{summary['top_k']}, {trace.expert_bytes / 2**20:.2f} MiB each)"
        )
        quality = summary["early_prediction"]
        if quality is not None and len(trace.layers) > 1:
            print(
                f"predict  each router on the previous MoE layer's input: precision {quality['precision']:.1%}, "
                f"recall {quality['recall']:.1%}"
            )
        print(f"next     moekit cache-sim {args.out} --budget {len(trace.layers) * trace.experts // 2} --prefetch")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "trace",
        help="record the routed experts a model's tokens choose on real text (for moekit cache-sim)",
        description="Run text through the model and record, per token and MoE layer, the experts the router "
        "chose: a safetensors file (ids [tokens, layers, k]) with the model's expert size, for moekit cache-sim.",
    )
    p.add_argument("model", help="model directory or moekit run")
    p.add_argument("--data", help="a text file or directory (default: the Python standard library's source)")
    p.add_argument("--out", required=True, help="the trace file to write (.safetensors)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens to trace (4096)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=run)
