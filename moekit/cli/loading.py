"""How the commands that run a model load it: dtype, quantize-on-load and the expert memory budget, as the same
flags everywhere (moekit generate, moekit serve)."""

from __future__ import annotations

import argparse

PREFETCH = {"auto": "auto", "on": True, "off": False}


def add_loading_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the dtype of what the files hold in float (default float32, the fast one on CPUs)",
    )
    p.add_argument(
        "--quantize",
        metavar="SPEC",
        help="quantize float modules while loading, as moekit quantize --weights names them (e.g. rest=q8: a "
        "checkpoint shipped with MXFP4 experts and bf16 attention fits and decodes in fp32 + 8-bit)",
    )
    p.add_argument(
        "--expert-memory",
        metavar="SIZE",
        help="the model's memory budget (8GB, 512MiB): routed experts stay in the files and are read into a pool "
        "of slots in what the rest of the model leaves (the output is the resident model's)",
    )
    p.add_argument(
        "--expert-policy",
        default="lru",
        choices=["lru", "lfu", "lfu-decay"],
        help="which cached expert a miss evicts (default lru; lfu-decay: use counts halving every 64 tokens)",
    )
    p.add_argument(
        "--prefetch",
        default="auto",
        choices=list(PREFETCH),
        help="read the next layer's predicted experts ahead (its router on this layer's input): auto (default) "
        "while the predictions are at least half right",
    )


def load_model(path, args: argparse.Namespace):
    """The model at path as the loading flags ask."""
    import moekit

    return moekit.from_pretrained(
        path,
        dtype=args.dtype,
        quantize=args.quantize,
        expert_memory=args.expert_memory,
        expert_policy=args.expert_policy,
        prefetch=PREFETCH[args.prefetch],
    )
