"""Quantized CPU inference: moekit at 8-bit, 4-bit and MXFP4 against llama.cpp (through llama-cpp-python, from
moekit's own GGUF export of the same weights) at Q8_0, Q4_0, Q4_K_M and MXFP4, and both at fp32.

The same random weights throughout: transformers makes the model, `moekit quantize` writes moekit's checkpoints
(8-bit: every matrix q8, 4-bit: every matrix q4, MXFP4: the routed experts MXFP4, as gpt-oss ships them, the rest
quantized to q8 while loading: llama.cpp's MXFP4 file's bits), `moekit export-gguf` the llama.cpp files (f32,
q8_0, q4_0, mxfp4: experts MXFP4, the rest Q8_0), llama.cpp's own quantizer Q4_K_M from the f32 file. Decode: a
16-token prompt then 64 new tokens, greedy, per-token time = (time for 64 - time for 1) / 63; llama.cpp by `eval` of
each token and the argmax of its logits, nothing sampled in Python. Prefill: 512 tokens into an empty cache, the
last token's logits. Floor of decode: the bytes one token reads at that format's bits (the planner's count: every
weight but the routed experts and the embedding table, top-k experts per MoE layer, the KV cache) over the read
bandwidth measured in the same run. Everything is measured in interleaved rounds and the medians are reported.

    python benchmarks/quantized.py [--models mixtral qwen3 gpt-oss] [--rounds 3] [--json results.json] [--markdown]
    python benchmarks/quantized.py --table benchmarks/results/quantized.json --markdown

Needs llama-cpp-python (it compiles llama.cpp on install; see docs/quantization.md for a build that runs on CPUs
whose AMX path crashes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, read_bandwidth, timeit  # noqa: E402
from generate import COMMON, MODELS, NEW, PREFILL, PROMPT  # noqa: E402

import moekit  # noqa: E402
from moekit.checkpoint.gguf_export import export_gguf  # noqa: E402
from moekit.infer.cache import KVCache  # noqa: E402
from moekit.plan.model_stats import model_stats  # noqa: E402
from moekit.plan.precision import WeightPrecision  # noqa: E402
from moekit.plan.roofline import decode_bytes  # noqa: E402
from moekit.quant.quantize import quantize_checkpoint  # noqa: E402

GPT_OSS = (
    "gpt-oss-like (8 layers, D=1024, 16/4 heads, head_dim 64, 32 experts top-4, F=1024, sliding 128)",
    "gpt_oss",
    dict(
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        intermediate_size=1024,
        sliding_window=128,
    ),
)
ALL_MODELS = {**MODELS, "gpt-oss": GPT_OSS}
# label: (moekit quantize --weights, None = the fp32 model; from_pretrained's quantize; (experts, rest) bits for the
# floor; llama.cpp types beside it)
SETTINGS = {
    "fp32": (None, None, ("fp32", "fp32"), ["f32"]),
    "8-bit": ("rest=q8", None, ("q8_0", "q8_0"), ["q8_0"]),
    "4-bit": ("rest=q4", None, ("q4_0", "q4_0"), ["q4_0", "q4_k_m"]),
    "MXFP4": ("experts=mxfp4", "rest=q8", ("mxfp4", "q8_0"), ["mxfp4"]),
}
LLAMA_BITS = {"f32": ("fp32", "fp32"), "q8_0": ("q8_0", "q8_0"), "q4_0": ("q4_0", "q4_0")}
LLAMA_BITS |= {"q4_k_m": ("q4_k_m", "q4_k_m"), "mxfp4": ("mxfp4", "q8_0")}
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h


def floor_bytes(model, bits: tuple[str, str], context: int) -> float:
    parts = decode_bytes(model_stats(model.config), 1, context, WeightPrecision(*bits), 4)
    return parts["experts"] + parts["other_weights"] + parts["kv_cache"]


def q4_k_m(llama_cpp, f32_path: Path, out: Path) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(f32_path).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {f32_path} to Q4_K_M")


class LlamaRunner:
    """A llama.cpp model driven token by token: eval, argmax of the last logits (the least Python per token)."""

    def __init__(self, llama_cpp, path: Path):
        self.llama_cpp, threads = llama_cpp, torch.get_num_threads()
        self.llm = llama_cpp.Llama(
            str(path),
            n_ctx=PREFILL + 64,
            n_batch=PREFILL,
            n_ubatch=PREFILL,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )

    def generate(self, prompt: list[int], n: int) -> list[int]:
        llm, out = self.llm, []
        llm.reset()
        llm.eval(prompt)
        for i in range(n):
            out.append(int(np.argmax(self.last_logits())))
            if i < n - 1:
                llm.eval(out[-1:])
        return out

    def last_logits(self) -> np.ndarray:
        """The last evaluated token's logits, read in place (without logits_all, Llama keeps no scores)."""
        pointer = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))

    def prefill(self, prompt: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(prompt)


def decode_time(generate) -> float:
    one = timeit(lambda: generate(1), min_reps=3, budget_s=1.0)
    full = timeit(lambda: generate(NEW), min_reps=2, budget_s=2.0)
    return (full - one) / (NEW - 1)


def measure(name: str, directory: Path, rounds: int) -> dict:
    import llama_cpp
    import transformers

    title, family, kw = ALL_MODELS[name]
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(family, **COMMON, **kw)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(directory / name)
    source = directory / name
    moekit_models, llamas = {}, {}
    for label, (weights, on_load, _, types) in SETTINGS.items():
        path = source
        if weights is not None:
            path = directory / f"{name}-{label}"
            quantize_checkpoint(source, path, weights)
        moekit_models[label] = moekit.from_pretrained(path, dtype=torch.float32, quantize=on_load)
        for t in types:
            gguf = directory / f"{name}-{t}.gguf"
            if t == "q4_k_m":
                q4_k_m(llama_cpp, directory / f"{name}-f32.gguf", gguf)
            else:
                export_gguf(source, gguf, t)
            llamas[t] = LlamaRunner(llama_cpp, gguf)
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT))
    long_prompt = torch.randint(0, cfg.vocab_size, (1, PREFILL))
    runs: dict[str, list[float]] = {"bandwidth": []}
    with torch.no_grad():
        # the same model on both sides: llama.cpp's f32 logits within its f16 KV cache's rounding of moekit's
        ours = moekit_models["fp32"](prompt)[0, -1]
        llamas["f32"].prefill(prompt[0].tolist())
        theirs = torch.from_numpy(llamas["f32"].last_logits().copy())
        error = float((theirs - ours).abs().max() / ours.abs().max())
        assert error < 2e-3, f"llama.cpp and moekit disagree at f32: logits differ by {error:.2e} (relative)"
        for _ in range(rounds):  # interleaved: this machine's bandwidth drifts by a third from minute to minute
            runs["bandwidth"].append(read_bandwidth())
            for label, model in moekit_models.items():
                decode = decode_time(lambda n, m=model: m.generate(prompt, n))
                runs.setdefault(f"moekit {label} decode", []).append(decode)
                prefill = timeit(lambda m=model: m(long_prompt, cache=KVCache(), logits_to_keep=1), budget_s=2.0)
                runs.setdefault(f"moekit {label} prefill", []).append(prefill)
                for t in SETTINGS[label][3]:
                    runner = llamas[t]
                    decode = decode_time(lambda n, r=runner: r.generate(prompt[0].tolist(), n))
                    runs.setdefault(f"llama {t} decode", []).append(decode)
                    prefill = timeit(lambda r=runner: r.prefill(long_prompt[0].tolist()), budget_s=2.0)
                    runs.setdefault(f"llama {t} prefill", []).append(prefill)
    med = {k: statistics.median(v) for k, v in runs.items()}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in runs.items()}
    context = PROMPT + NEW // 2
    reference = moekit_models["fp32"]
    rows = []
    for label, (_, _, bits, types) in SETTINGS.items():
        for t in types:
            rows.append(
                {
                    "setting": label,
                    "llama_type": t,
                    "moekit_decode_s": med[f"moekit {label} decode"],
                    "llama_decode_s": med[f"llama {t} decode"],
                    "moekit_prefill_s": med[f"moekit {label} prefill"],
                    "llama_prefill_s": med[f"llama {t} prefill"],
                    "moekit_floor_bytes": floor_bytes(reference, bits, context),
                    "llama_floor_bytes": floor_bytes(reference, LLAMA_BITS[t], context),
                }
            )
    return {"title": title, "bandwidth": med["bandwidth"], "rows": rows, "rounds": runs, "spread": spread}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=list(ALL_MODELS))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (3)")
    parser.add_argument("--table", metavar="RESULTS", help="print the table of an earlier run's JSON and stop")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(Path(args.table).read_text()), args.markdown)
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/quantized.py needs llama-cpp-python: pip install llama-cpp-python") from None
    results = {}
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:  # one model's files at a time: the f32 ones are large
            results[name] = measure(name, Path(tmp), args.rounds)
    bandwidth = statistics.median(r["bandwidth"] for r in results.values())
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "read_bandwidth_gbs": bandwidth / 1e9,
        "models": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print_table(report, args.markdown)


def print_table(report: dict, markdown: bool) -> None:
    header = (
        "| model | moekit | llama.cpp | decode tok/s moekit | llama.cpp | time / floor moekit | llama.cpp "
        "| speed-up | prefill tok/s moekit | llama.cpp | speed-up |"
    )
    print(f"{report['date']}, {report['machine']}, read bandwidth {report['read_bandwidth_gbs']:.1f} GB/s")
    print(header if markdown else header.replace("|", " "))
    if markdown:
        print("|---" * 11 + "|")
    for r in report["models"].values():
        for row in r["rows"]:
            bw = r["bandwidth"]
            cells = [
                r["title"].split(" (")[0],
                row["setting"],
                row["llama_type"].upper(),
                f"{1 / row['moekit_decode_s']:.1f}",
                f"{1 / row['llama_decode_s']:.1f}",
                f"{row['moekit_decode_s'] * bw / row['moekit_floor_bytes']:.2f}x",
                f"{row['llama_decode_s'] * bw / row['llama_floor_bytes']:.2f}x",
                f"{row['llama_decode_s'] / row['moekit_decode_s']:.2f}x",
                f"{PREFILL / row['moekit_prefill_s']:.0f}",
                f"{PREFILL / row['llama_prefill_s']:.0f}",
                f"{row['llama_prefill_s'] / row['moekit_prefill_s']:.2f}x",
            ]
            print(("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
