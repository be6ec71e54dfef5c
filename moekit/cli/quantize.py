"""`moekit quantize`: a float checkpoint rewritten quantized, a precision per class of tensor."""

from __future__ import annotations

import argparse
import json
import sys

from moekit.cli.format import gb


def run(args: argparse.Namespace) -> int:
    from moekit.quant.choices import AUTO, parse_weights
    from moekit.quant.mixed import CHOICE_FILE as EXPERT_FORMATS
    from moekit.quant.quantize import quantize_checkpoint

    def progress(done: int, total: int) -> None:
        if not args.json and sys.stderr.isatty():
            print(f"\rquantizing tensors {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    if parse_weights(args.weights)["experts"] == AUTO and not args.json:  # minutes on a large model: say what runs
        print(
            f"experts=auto: calibrating on {args.calibration_tokens} tokens (a forward and backward pass of the float "
            "model, then each expert in each format)",
            file=sys.stderr,
            flush=True,
        )
    report = quantize_checkpoint(
        args.model,
        args.out,
        args.weights,
        progress,
        target_bits=args.target_bits,
        target_gb=args.target_gb,
        calibration=args.calibration,
        calibration_tokens=args.calibration_tokens,
    )
    auto = report.pop("experts_auto", None)
    if args.json:
        print(json.dumps({"out": args.out, "classes": report, "experts_auto": auto}, indent=2))
        return 0
    if auto is not None:
        counts = ", ".join(f"{n} {c}" for c, n in auto["experts_per_format"].items() if n)
        uniform = ", ".join(f"{c} {e:.4g}" for c, e in auto["error_uniform"].items())
        print(
            f"experts=auto: {counts} ({auto['bits_per_weight']:.2f} bits per routed-expert weight); loss score "
            f"{auto['error']:.4g} (uniform: {uniform}); the choice: {args.out}/{EXPERT_FORMATS}"
        )
        for module, layer in auto["layers"].items():
            print(f"  {module}: {' '.join(layer['formats'])}")
    before = sum(r["bytes_before"] for r in report.values())
    after = sum(r["bytes_after"] for r in report.values())
    print(f"{'class':<10} {'format':<7} {'tensors':>8} {'weights':>12} {'before':>10} {'after':>10} {'bits/w':>7}")
    for name, r in report.items():
        if r["tensors"]:
            bits = 8 * r["bytes_after"] / r["weights"]
            print(
                f"{name:<10} {r['format']:<7} {r['tensors']:>8} {r['weights']:>12,} {gb(r['bytes_before']):>10} "
                f"{gb(r['bytes_after']):>10} {bits:>7.2f}"
            )
    print(f"wrote {args.out}: {gb(before)} -> {gb(after)}")
    return 0


def add_parser(sub) -> None:
    q = sub.add_parser(
        "quantize",
        help="rewrite a float checkpoint quantized (8/4-bit groups, MXFP4, FP8), a precision per class of tensor",
        description="Classes: experts (routed), shared (shared experts), attention, dense (dense FFN layers), "
        "embedding, head; 'rest' names the classes not given. Formats: q8, q4 (symmetric, group 32), q4m (4-bit "
        "with a per-group minimum), q3, q2, mxfp4, fp8 (e4m3, 128x128 blocks), bf16, fp32, keep; experts=auto: a "
        "format (q2/q3/q4/q4m/q8) per routed expert within --target-bits or --target-gb, from the loss each "
        "expert's rounding would add on calibration text (usage and sensitivity together). Routers, norms and biases "
        "stay in full precision. Output: a Hugging Face directory (compressed-tensors pack-quantized for q8..q2, "
        "quant_method mxfp4 or fp8 otherwise).",
    )
    q.add_argument("model", help="model directory (config.json + safetensors) or a training run")
    q.add_argument("--out", required=True, help="new directory to write (must not exist)")
    q.add_argument("--weights", default="experts=q4,rest=q8", help="CLASS=FORMAT,... (default experts=q4,rest=q8)")
    q.add_argument("--target-bits", type=float, help="experts=auto: bits per routed-expert weight, scales included")
    q.add_argument("--target-gb", type=float, help="experts=auto: the whole checkpoint's size in GB (1e9 bytes)")
    q.add_argument(
        "--calibration",
        metavar="PATH",
        help="experts=auto: text file or directory (default: the Python standard library's training files)",
    )
    q.add_argument("--calibration-tokens", type=int, default=16384, help="experts=auto: tokens to run (16384)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(fn=run)
