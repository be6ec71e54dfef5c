"""Training speed: moekit against transformers training the same architecture on the same weights, batch and
sequence length, in one run: tokens/s of a whole optimizer step (forward, loss with the balancing term each library
adds, backward, AdamW step), fp32. Next to it the step's rate against a dense matmul of the same FLOPs.

Models (random weights made by transformers, saved with save_pretrained and loaded by moekit):
  deepseek-v3-like: 4 layers, D=256, MLA (q rank 64, kv rank 64), dense first layer, 32 experts top-4 within 2 of
                    8 groups, sigmoid + selection bias, 1 shared expert, F=128
  mixtral-like:     4 layers, D=256, 8/4 heads, 8 experts top-2, F=512
Batch 8 x 256 tokens. Steps are interleaved between the two libraries over several rounds; medians are reported.

    python benchmarks/train_step.py [--models deepseek mixtral] [--rounds 3] [--steps 5] [--json F] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, matmul_rate  # noqa: E402

import moekit  # noqa: E402
from moekit.routing.balancing import LossFreeBalancer  # noqa: E402

COMMON = dict(num_hidden_layers=4, hidden_size=256, vocab_size=4096, max_position_embeddings=1024)
MODELS = {
    "deepseek": (
        "deepseek-v3-like (4 layers, D=256, MLA, 32 experts top-4 + 1 shared, F=128)",
        "deepseek_v3",
        dict(
            num_attention_heads=8,
            num_key_value_heads=8,
            q_lora_rank=64,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=32,
            num_experts_per_tok=4,
            n_group=8,
            topk_group=2,
            n_shared_experts=1,
            moe_intermediate_size=128,
            intermediate_size=768,
            first_k_dense_replace=1,
            num_nextn_predict_layers=0,
            rope_scaling=None,
        ),
    ),
    "mixtral": (
        "mixtral-like (4 layers, D=256, 8/4 heads, 8 experts top-2, F=512)",
        "mixtral",
        dict(
            num_attention_heads=8,
            num_key_value_heads=4,
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=512,
        ),
    ),
}
BATCH, SEQ = 8, 256


def _loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def measure(name: str, directory: Path, rounds: int, steps: int) -> dict:
    """Both libraries' step times in interleaved rounds, with the dense matmul rate probed between them (best kept)."""
    import transformers

    title, family, kw = MODELS[name]
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(family, **COMMON, **kw)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).train()
    hf.save_pretrained(directory / name)
    ours = moekit.from_pretrained(directory / name, dtype=torch.float32).train()
    balancer = LossFreeBalancer(ours.routers(), 1e-3)
    # fused AdamW for both (transformers' Trainer defaults to it too)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))

    def step_hf():
        out = hf(input_ids=ids)
        _loss(out.logits, ids).backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    def step_ours():
        out = ours(ids, return_routing=True)
        (_loss(out.logits, ids) + out.aux_loss).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        balancer.step()

    def timed(fn) -> list[float]:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return times

    step_hf(), step_ours()  # warm-up
    t_hf, t_ours, rate = [], [], matmul_rate()
    for _ in range(rounds):
        t_hf += timed(step_hf)
        t_ours += timed(step_ours)
        rate = max(rate, matmul_rate())
    s_hf, s_ours = statistics.median(t_hf), statistics.median(t_ours)
    n = ours.config
    # forward + backward of the active weights; the input embedding is a lookup, not a matmul (attention scores are
    # not counted either)
    active = moekit.model.count.count_parameters(ours)["active_without_input_embedding"]
    flops = 6 * active * BATCH * SEQ
    tokens = BATCH * SEQ
    return {
        "model": title,
        "layers": n.num_layers,
        "tokens_per_step": tokens,
        "moekit_tokens_per_s": tokens / s_ours,
        "transformers_tokens_per_s": tokens / s_hf,
        "speedup": s_hf / s_ours,
        "moekit_step_s": s_ours,
        "transformers_step_s": s_hf,
        "moekit_tflops": flops / s_ours / 1e12,
        "transformers_tflops": flops / s_hf / 1e12,
        "dense_matmul_tflops": rate / 1e12,
        "fraction_of_dense_matmul": flops / s_ours / rate,
        "transformers_fraction_of_dense_matmul": flops / s_hf / rate,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per library per round")
    p.add_argument("--json")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            rows.append(measure(name, Path(d), args.rounds, args.steps))
    result = {"date": datetime.date.today().isoformat(), "machine": machine(), "batch": BATCH, "seq": SEQ, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        print(f"{result['machine']}, batch {BATCH} x {SEQ} tokens, fp32, fused AdamW; medians of interleaved rounds\n")
        print("| model | moekit tok/s | transformers tok/s | speedup | moekit / transformers vs dense matmul |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['model']} | {r['moekit_tokens_per_s']:,.0f} | {r['transformers_tokens_per_s']:,.0f} | "
                f"{r['speedup']:.2f}x | {r['fraction_of_dense_matmul']:.0%} / "
                f"{r['transformers_fraction_of_dense_matmul']:.0%} |"
            )
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
