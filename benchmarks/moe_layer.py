"""One MoE layer, forward and forward+backward: moekit's fast backend and loop against transformers' own block
with each experts implementation that runs here, on the same weights and inputs, next to the floor.

Floor = max(bytes of the experts actually touched / measured read bandwidth, FLOPs / measured dense matmul rate),
both rates measured again (best of a few runs) before each row and between its rounds, the best kept: this machine's
speed drifts by 20% and more within minutes, and a floor from another minute would flatter or wrong the row. For
the same reason the implementations take turns: ROUNDS rounds, each timing every implementation once in turn (the
median of a short burst), and a cell is the median of its rounds.
Each call takes the next of VARIANTS different inputs, as successive decode steps and batches do: one input
repeated would leave a one-token step's experts (38 MB for the qwen3-like layer) partly in a 32 MB L3 and time
that cache rather than the memory every new token reads from. The bytes in the floor are the mean over the inputs.
The forward runs as inference (eval mode, no_grad), forward+backward in training mode, on both sides, with the
layer's input requiring its gradient as inside a model (else the first expert product's input gradient is skipped).
Forward+backward: 3x the forward's FLOPs; bytes = the touched experts read twice plus the whole dense weight
gradient (all E experts) written once.
Beside them, the compute reference timed in the same rounds: a dense matmul of equal FLOPs (the tokens' k expert
rows through one expert-sized FFN, its activation left out: three products forward, six backward).

    python benchmarks/moe_layer.py [--tokens 1 16 256 2048] [--json results.json]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import statistics  # noqa: E402

from common import machine, matmul_rate, read_bandwidth, timeit  # noqa: E402

from moekit import MoEBlock  # noqa: E402
from moekit.families import moe_from_hf  # noqa: E402
from moekit.infer.fast import prepare_block  # noqa: E402

SHAPES = {
    "qwen3-like (D=1024, E=64, F=384, top-8)": (
        "qwen3_moe",
        "Qwen3MoeSparseMoeBlock",
        dict(num_experts=64, num_experts_per_tok=8, moe_intermediate_size=384, norm_topk_prob=True),
    ),
    "mixtral-like (D=1024, E=8, F=3584, top-2)": (
        "mixtral",
        "MixtralSparseMoeBlock",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=3584),
    ),
}
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
DENSE = "dense matmul, equal FLOPs"
ROUNDS = 5
VARIANTS = 8


def build(family: str, cls: str, kw: dict):
    import importlib

    import transformers

    cfg = transformers.AutoConfig.for_model(family, hidden_size=1024, num_hidden_layers=1, **kw)
    hf_block = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), cls)(cfg)
    with torch.no_grad():
        for p in hf_block.parameters():
            p.normal_(std=0.02)
    moe_cfg, _, _ = moe_from_hf(cfg.to_dict())
    block = MoEBlock(1024, moe_cfg)
    block.load_state_dict({k.replace("gate.weight", "router.weight"): v for k, v in hf_block.state_dict().items()})
    return cfg, hf_block, block


def run(tokens: list[int]) -> dict:
    torch.manual_seed(0)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "rows": []}
    print(f"# {results['machine']}; each row's floor from the best read and matmul rates measured around its rounds")
    for shape, (family, cls, kw) in SHAPES.items():
        cfg, hf_block, block = build(family, cls, kw)
        e, k, f = block.cfg.num_experts, block.cfg.top_k, block.cfg.expert_hidden
        expert_bytes = 3 * 1024 * f * 4
        for t in tokens:
            xs = [(torch.randn(1, t, 1024) * 0.5).requires_grad_() for _ in range(VARIANTS)]
            with torch.no_grad():
                touched = statistics.mean(
                    int((block.router(x.view(-1, 1024)).tokens_per_expert_E > 0).sum()) for x in xs
                )
            dense, rows = DenseEqualFlops(1024, f), (torch.randn(t * k, 1024) * 0.5).requires_grad_()
            x_next = itertools.cycle(xs).__next__
            impls = {"moekit grouped": lambda: block(x_next())[0], "moekit loop": lambda: block(x_next())[0]}
            for name in HF_IMPLS:
                if name == "batched_mm" and t * k * expert_bytes > 4e9:
                    continue  # it gathers one weight copy per (token, expert): out of memory here
                impls[f"transformers {name}"] = lambda name=name: _hf(cfg, hf_block, x_next(), name)
            impls[DENSE] = lambda: dense(rows)
            flops = 2 * t * k * 3 * 1024 * f
            for mode in ("fwd", "fwd+bwd"):
                bw, rate, times = read_bandwidth(), matmul_rate(), {name: [] for name in impls}
                for _ in range(ROUNDS):
                    for name, fn in impls.items():
                        block.set_backend("loop" if name == "moekit loop" else "grouped")
                        prepare_block(block)  # the fused block step at inference, where it covers the block
                        step = _step(fn, mode, (block, hf_block, dense), (*xs, rows))
                        times[name].append(1e3 * timeit(step, budget_s=0.5))
                    bw, rate = max(bw, read_bandwidth()), max(rate, matmul_rate())
                if mode == "fwd":
                    floor = max(touched * expert_bytes / bw, flops / rate)
                else:
                    floor = max((2 * touched + e) * expert_bytes / bw, 3 * flops / rate)
                row = {"shape": shape, "tokens": t, "mode": mode, "floor_ms": floor * 1e3, "ms": {}}
                row |= {"read_GBps": bw / 1e9, "matmul_GFLOPs": rate / 1e9}
                row["ms"] = {name: statistics.median(ts) for name, ts in times.items()}
                row["rounds_ms"] = times
                results["rows"].append(row)
                best_hf = min(v for n, v in row["ms"].items() if n.startswith("transformers"))
                cells = "  ".join(f"{n} {v:8.2f} ({v / row['floor_ms']:.2f}x)" for n, v in row["ms"].items())
                print(
                    f"{shape[:12]} T={t:<5} {mode:<8} floor {row['floor_ms']:8.2f} ms | {cells} | "
                    "moekit vs best transformers: "
                    f"{best_hf / row['ms']['moekit grouped']:.2f}x faster, "
                    f"vs the dense matmul: {row['ms']['moekit grouped'] / row['ms'][DENSE]:.2f}x its time",
                    flush=True,
                )
    return results


def _hf(cfg, hf_block, x, impl):
    cfg._experts_implementation = impl
    out = hf_block(x)
    return out[0] if isinstance(out, tuple) else out


class DenseEqualFlops(torch.nn.Module):
    """The FLOPs of one MoE layer's expert products as a dense matmul: every row through one expert-sized FFN."""

    def __init__(self, hidden: int, expert_hidden: int):
        super().__init__()
        self.gate, self.up = (torch.nn.Linear(hidden, expert_hidden, bias=False) for _ in range(2))
        self.down = torch.nn.Linear(expert_hidden, hidden, bias=False)

    def forward(self, rows_SD: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate(rows_SD) + self.up(rows_SD))


def _step(fn, mode, modules, inputs):
    """The timed step: the forward in inference mode (eval, no_grad), as a server runs it, or forward+backward in
    training mode."""
    for m in modules:
        m.train(mode != "fwd")
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                fn()

        return fwd

    def fwd_bwd():
        for m in modules:
            m.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None
        fn().sum().backward()

    return fwd_bwd


def markdown(results: dict) -> str:
    names = list(results["rows"][0]["ms"])
    reads = [r["read_GBps"] for r in results["rows"]]
    rates = [r["matmul_GFLOPs"] for r in results["rows"]]
    lines = [
        f"Measured {results['date']} on {results['machine']} (floors from the best rates around each row: read "
        f"{min(reads):.1f}-{max(reads):.1f} GB/s, matmul {min(rates):.0f}-{max(rates):.0f} GFLOP/s). "
        f"Cells: ms (multiple of the floor), medians of {ROUNDS} interleaved rounds.",
        "",
        "| layer | T | pass | floor ms | " + " | ".join(names) + " |",
        "|" + "---|" * (4 + len(names)),
    ]
    for r in results["rows"]:
        cells = [f"{r['ms'][n]:.1f} ({r['ms'][n] / r['floor_ms']:.2f}x)" if n in r["ms"] else "n/a" for n in names]
        lines.append(
            f"| {r['shape'].split(' ')[0]} | {r['tokens']} | {r['mode']} | {r['floor_ms']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 2048])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = ap.parse_args()
    res = run(args.tokens)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if args.markdown:
        print(markdown(res))
