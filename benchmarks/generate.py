"""Generation speed: moekit against transformers' generate on the same random weights (fp32, transformers' default
experts backend), decode tokens/s at batch 1 and prefill tokens/s, next to the memory-bandwidth floor of decode.

Decode: a 16-token prompt then 64 new tokens, greedy; per-token time = (time for 64 new tokens - time for 1) / 63,
so prefill is not counted. Prefill: one 512-token forward that fills a KV cache and gives the next token's logits
(logits_to_keep=1 on both sides, as both libraries' generate do). Floor of decode: the bytes one
token reads (every weight but the routed experts and the embedding table, plus top-k experts per MoE layer, plus
the KV cache) over this machine's measured read bandwidth. Everything, the bandwidth included, is measured in
interleaved rounds and the medians are reported.

    python benchmarks/generate.py [--models mixtral qwen3] [--rounds 5] [--json results.json] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, read_bandwidth, timeit  # noqa: E402

import moekit  # noqa: E402
from moekit.infer.cache import KVCache  # noqa: E402
from moekit.infer.fast import prepare_inference  # noqa: E402
from moekit.plan.model_stats import model_stats  # noqa: E402
from moekit.plan.precision import WeightPrecision  # noqa: E402
from moekit.plan.roofline import decode_bytes  # noqa: E402

COMMON = dict(num_hidden_layers=8, hidden_size=1024, vocab_size=32000, max_position_embeddings=4096)
MODELS = {
    "mixtral": (
        "mixtral-like (8 layers, D=1024, 16/8 heads, 8 experts top-2, F=3584)",
        "mixtral",
        dict(
            num_attention_heads=16,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=3584,
        ),
    ),
    "qwen3": (
        "qwen3-moe-like (8 layers, D=1024, 16/4 heads, head_dim 64, 64 experts top-8, F=384)",
        "qwen3_moe",
        dict(
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            num_experts=64,
            num_experts_per_tok=8,
            moe_intermediate_size=384,
            norm_topk_prob=True,
        ),
    ),
    "deepseek_v3": (
        "deepseek-v3-like (8 layers, D=1024, 16 MLA heads: q rank 384, latent 256 + rope 32, 64 experts top-6 in "
        "4 of 8 groups, 1 shared, F=384, 1 dense layer)",
        "deepseek_v3",
        dict(
            num_attention_heads=16,
            num_key_value_heads=16,
            q_lora_rank=384,
            kv_lora_rank=256,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            n_routed_experts=64,
            num_experts_per_tok=6,
            n_group=8,
            topk_group=4,
            n_shared_experts=1,
            moe_intermediate_size=384,
            intermediate_size=2816,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
        ),
    ),
    "deepseek_v4": (
        "deepseek-v4-like (8 layers, D=1024, 16 heads of 128 on one K=V head, window 128, CSA 1/4 with a 16-head "
        "indexer keeping 64, HCA 1/128, 4 hyper streams, 64 experts top-6, 1 shared, F=384, 2 token-table layers)",
        "deepseek_v4",
        dict(
            num_attention_heads=16,
            num_key_value_heads=1,
            head_dim=128,
            partial_rotary_factor=0.25,
            q_lora_rank=384,
            o_groups=4,
            o_lora_rank=256,
            index_n_heads=16,
            index_head_dim=64,
            index_topk=64,
            sliding_window=128,
            n_routed_experts=64,
            num_experts_per_tok=6,
            n_shared_experts=1,
            moe_intermediate_size=384,
            hc_mult=4,
            num_hash_layers=2,
        ),
    ),
    "qwen3.5": (
        "qwen3.5-like hybrid (8 layers: 6 Gated DeltaNet with 8 key / 16 value heads of 128, 2 gated attention with "
        "8/2 heads of 128; D=1024, 64 experts top-8, F=384, 1 gated shared)",
        "qwen3_5_moe_text",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            linear_num_key_heads=8,
            linear_num_value_heads=16,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            num_experts=64,
            num_experts_per_tok=8,
            moe_intermediate_size=384,
            shared_expert_intermediate_size=384,
        ),
    ),
}
PROMPT, NEW, PREFILL = 16, 64, 512


def decode_floor_bytes(model, context: int) -> float:
    """Bytes one fp32 decode step reads at batch 1 with `context` cached tokens (the planner's own count)."""
    parts = decode_bytes(model_stats(model.config), 1, context, WeightPrecision("fp32", "fp32"), 4)
    return parts["experts"] + parts["other_weights"] + parts["kv_cache"]


def measure(name: str, directory: Path, rounds: int) -> dict:
    import transformers

    title, family, kw = MODELS[name]
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(family, **COMMON, **kw)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.generation_config.eos_token_id = None  # always generate all tokens
    hf.save_pretrained(directory / name)
    model = moekit.from_pretrained(directory / name, dtype=torch.float32)
    prepare_inference(model)  # for the prefill timed below (generate prepares the model itself)
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT))
    long_prompt = torch.randint(0, cfg.vocab_size, (1, PREFILL))

    def hf_generate(n: int):
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def decode_time(generate) -> float:
        one = timeit(lambda: generate(1), min_reps=3, budget_s=2.0)
        full = timeit(lambda: generate(NEW), min_reps=2, budget_s=4.0)
        return (full - one) / (NEW - 1)

    # Interleaved rounds, medians: this machine's bandwidth drifts by a third from minute to minute.
    runs: dict[str, list[float]] = {k: [] for k in ("m_decode", "t_decode", "m_prefill", "t_prefill", "bandwidth")}
    with torch.no_grad():
        for _ in range(rounds):
            runs["bandwidth"].append(read_bandwidth())
            runs["m_decode"].append(decode_time(lambda n: model.generate(prompt, n)))
            runs["t_decode"].append(decode_time(hf_generate))
            runs["m_prefill"].append(
                timeit(lambda: model(long_prompt, cache=KVCache(), logits_to_keep=1), budget_s=3.0)
            )
            runs["t_prefill"].append(timeit(lambda: hf(long_prompt, use_cache=True, logits_to_keep=1), budget_s=3.0))
    assert model.generate(prompt, 16).tolist() == hf_generate(16).tolist(), "moekit and transformers disagree"
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "title": title,
        "floor_bytes": decode_floor_bytes(model, PROMPT + NEW // 2),
        "bandwidth": med["bandwidth"],
        "moekit": {"decode_s": med["m_decode"], "prefill_s": med["m_prefill"]},
        "transformers": {"decode_s": med["t_decode"], "prefill_s": med["t_prefill"]},
        "rounds": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported (5)")
    parser.add_argument("--report", help="print the table of a results file written by --json, measuring nothing")
    args = parser.parse_args()
    if args.report:
        print_table(json.loads(Path(args.report).read_text()), args.markdown)
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows[name] = measure(name, Path(tmp), args.rounds)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "read_bandwidth_gbs": statistics.median(r["bandwidth"] for r in rows.values()) / 1e9,
        "models": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print_table(report, args.markdown)


def print_table(report: dict, markdown: bool) -> None:
    """The results as a table. moekit / floor is the median over rounds of each round's decode against the
    bandwidth read in that round (this VM switches between two speeds, ~35 and ~65 GB/s, from minute to minute:
    a median bandwidth against a median decode time can mix the two)."""
    header = (
        "| model | decode tok/s moekit | transformers | floor | moekit / floor | speed-up "
        "| prefill tok/s moekit | transformers | speed-up |"
    )
    reads = [b for r in report["models"].values() for b in r["rounds"]["bandwidth"]]
    print(f"{report['date']}, {report['machine']}, read bandwidth {min(reads) / 1e9:.1f}-{max(reads) / 1e9:.1f} GB/s")
    print(header if markdown else header.replace("|", " "))
    if markdown:
        print("|---" * 9 + "|")
    for r in report["models"].values():
        m, t, rounds = r["moekit"], r["transformers"], r["rounds"]
        floors = [bw / r["floor_bytes"] for bw in rounds["bandwidth"]]
        ratio = statistics.median(f * d for f, d in zip(floors, rounds["m_decode"], strict=True))
        cells = [
            r["title"],
            f"{1 / m['decode_s']:.1f}",
            f"{1 / t['decode_s']:.1f}",
            f"{statistics.median(floors):.1f}",
            f"{ratio:.2f}x",
            f"{t['decode_s'] / m['decode_s']:.2f}x",
            f"{PREFILL / m['prefill_s']:.0f}",
            f"{PREFILL / t['prefill_s']:.0f}",
            f"{t['prefill_s'] / m['prefill_s']:.2f}x",
        ]
        print(("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
