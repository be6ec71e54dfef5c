"""Quality of `moekit quantize` on a trained model: validation perplexity on the run's own held-out text (the
standard library's files the training never saw, as `moekit train` splits them) at fp32 and after each --weights
choice, beside the bytes each checkpoint holds and the bits per routed-expert weight. experts=auto (a format per
expert, calibrated on the run's training text) at each --auto-bits budget beside the uniform expert formats, the
rest at 8 bits throughout. Products run exactly (set_int8_activations off): this measures the weights' rounding;
the kernels' int8 activation rounding is measured by the decode benchmark.

    moekit train --out runs/main && python benchmarks/quant_quality.py runs/main [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

import moekit
from moekit.checkpoint.files import checkpoint_dir
from moekit.quant.held import set_int8_activations
from moekit.quant.quantize import quantize_checkpoint
from moekit.train.data import TokenStream, load_corpus
from moekit.train.tokenizer import ByteTokenizer

SPECS = ("rest=q8", "rest=q4", "rest=q4m") + tuple(f"experts={f},rest=q8" for f in ("q2", "q3", "q4", "q4m"))
AUTO_BITS = (3.0, 3.5, 4.0, 4.5, 5.5)


def held_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor]) -> float:
    total, n = 0.0, 0
    for ids_BT in windows:
        logits = model(ids_BT).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids_BT[:, 1:].flatten())
        total, n = total + float(loss) * ids_BT.shape[0], n + ids_BT.shape[0]
    return math.exp(total / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a moekit train run directory (byte tokenizer)")
    parser.add_argument("--specs", nargs="+", default=list(SPECS), help="--weights choices to compare")
    parser.add_argument("--auto-bits", nargs="*", type=float, default=list(AUTO_BITS), help="experts=auto budgets")
    parser.add_argument("--batches", type=int, default=16, help="validation batches of 16 windows (16)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="draw perplexity against routed-expert bits (uniform and auto) to this PNG")
    args = parser.parse_args()
    run = json.loads((Path(args.run) / "run.json").read_text())["train"]
    if run.get("tokenizer", "byte") != "byte":
        raise SystemExit("quant_quality.py reads byte-tokenizer runs (the main job's)")
    _, val_text, _ = load_corpus(run.get("data", ""), 1, run.get("max_val_bytes", 200_000))
    ids = torch.tensor(ByteTokenizer().encode(val_text), dtype=torch.long)
    windows = TokenStream(ids, run["seq_len"], "the validation text").windows(16, args.batches)
    source = checkpoint_dir(args.run)
    rows = [
        {"weights": "fp32", "bytes": held_bytes(source), "ppl": perplexity(moekit.from_pretrained(source), windows)}
    ]
    runs = [(spec, spec, {}) for spec in args.specs]
    runs += [(f"experts=auto ({b} bits),rest=q8", "experts=auto,rest=q8", {"target_bits": b}) for b in args.auto_bits]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, spec, budget) in enumerate(runs):
            out = Path(tmp) / str(i)
            report = quantize_checkpoint(source, out, spec, **budget)
            model = moekit.from_pretrained(out, dtype=torch.float32)
            set_int8_activations(model, False)
            experts = report["experts"]
            row = {"weights": label, "bytes": held_bytes(out), "ppl": perplexity(model, windows)}
            row["expert_bits"] = 8 * experts["bytes_after"] / experts["weights"]
            if "experts_auto" in report:
                row["experts_per_format"] = report["experts_auto"]["experts_per_format"]
            rows.append(row)
    base = rows[0]["ppl"]
    print("| weights | bytes | bits/weight vs fp32 | routed experts bits/weight | validation ppl | vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / base
        bits = 32 * r["bytes"] / rows[0]["bytes"]
        experts = f"{r['expert_bits']:.2f}" if "expert_bits" in r else "32"
        print(
            f"| {r['weights']} | {r['bytes'] / 1e6:.2f} MB | {bits:.2f} | {experts} | {r['ppl']:.4f} "
            f"| {r['ppl_ratio']:.4f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "windows": 16 * args.batches, "rows": rows}, indent=2))
    if args.plot:
        plot(rows, args.run, args.plot)


def plot(rows: list[dict], run: str, path: str) -> None:
    """Validation perplexity against bits per routed-expert weight: uniform expert formats and experts=auto (the
    rest 8-bit in both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, pick, style in (("uniform", "experts=q", "o-"), ("experts=auto", "experts=auto", "s-")):
        points = sorted((r["expert_bits"], r["ppl"]) for r in rows if r["weights"].startswith(pick))
        ax.plot(*zip(*points, strict=True), style, label=label)
    for r in rows:
        if r["weights"].startswith("experts=q"):
            ax.annotate(r["weights"].split(",")[0].removeprefix("experts="), (r["expert_bits"], r["ppl"]), fontsize=8)
    ax.axhline(rows[0]["ppl"], color="gray", linestyle=":", label="fp32")
    ax.set_xlabel("bits per routed-expert weight (scales included; the rest 8-bit)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"Mixed precision per expert: {Path(run).name}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
