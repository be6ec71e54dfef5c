"""Self-speculative decoding with multi-token prediction against plain decoding of the same model, in one run: the
MTP depths' acceptance rate, tokens per pass of the model, and decode tokens/s of both (greedy, so both produce
the same tokens, which the script checks).

The model: the 'tiny' preset of `moekit train` (DeepSeek-V3-shaped, MLA, 16 experts top-4 + 1 shared) with
mtp_layers MTP depths, trained on the standard library's source (or --run DIR, a finished run). Prompts: the
first bytes of held-out standard-library files.

    python benchmarks/speculative.py [--run DIR] [--mtp-layers 2] [--steps 300] [--tokens 128] [--rounds 5]
                                     [--temperature T]
                                     [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

import moekit  # noqa: E402
from moekit.infer.speculative import SpeculationStats  # noqa: E402
from moekit.infer.tokenizers import load_tokenizer  # noqa: E402
from moekit.train.config import load_run_config  # noqa: E402
from moekit.train.data import is_validation, stdlib_files  # noqa: E402
from moekit.train.trainer import Trainer  # noqa: E402


def train(run: Path, mtp_layers: int, steps: int) -> Path:
    model_cfg, train_cfg = load_run_config(overrides={"steps": steps})
    trainer = Trainer(replace(model_cfg, mtp_layers=mtp_layers), train_cfg, run, progress=True)
    trainer.start()
    trainer.run()
    return run / "final"


def prompts(count: int, length: int = 48) -> list[str]:
    out = []
    for path in stdlib_files():
        if is_validation(path):
            text = path.read_text(errors="ignore")
            if len(text) >= length:
                out.append(text[:length])
        if len(out) == count:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--run",
        help="a finished run (or model directory) with MTP layers, used if it exists, else trained "
        "there (default: trained in a temporary directory)",
    )
    p.add_argument("--mtp-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs compared); else sampled")
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(args.run or Path(d) / "run")
        if (path / "final").is_dir():
            path = path / "final"
        elif not (path / "config.json").is_file():
            path = train(path, args.mtp_layers, args.steps)
        model = moekit.from_pretrained(path, dtype=torch.float32)
        tokenizer = load_tokenizer(path, model.config.vocab_size)
        rows, plain_s, spec_s = [], [], []
        sampling = dict(temperature=args.temperature, seed=0)
        for prompt in prompts(args.prompts):
            ids = torch.tensor([tokenizer.encode(prompt)])
            model.generate(ids, 8), model.generate(ids, 8, speculative=True)  # warm-up
            times: dict[str, list[float]] = {"plain": [], "speculative": []}
            for _ in range(args.rounds):  # interleaved, medians: single runs of ~1 s drift by +-20% here
                t = time.perf_counter()
                plain = model.generate(ids, args.tokens, **sampling)
                times["plain"].append(time.perf_counter() - t)
                stats = SpeculationStats()
                t = time.perf_counter()
                fast = model.generate(ids, args.tokens, speculative=True, stats=stats, **sampling)
                times["speculative"].append(time.perf_counter() - t)
            plain_s.append(statistics.median(times["plain"]))
            spec_s.append(statistics.median(times["speculative"]))
            if args.temperature == 0 and not torch.equal(plain, fast):
                raise SystemExit("speculative greedy decoding differs from plain greedy decoding")
            text = tokenizer.decode(fast[0, ids.shape[1] :].tolist())
            rows.append({"prompt": prompt, "continuation": text, **stats.as_dict()})
    depths = range(len(model.mtp))
    checked = [sum(r["checked_by_depth"][j] for r in rows) for j in depths]
    accepted = [sum(r["accepted_by_depth"][j] for r in rows) for j in depths]
    tokens = args.tokens * len(rows)
    result = {
        "machine": machine(),
        "mtp_layers": len(model.mtp),
        "temperature": args.temperature,
        "tokens_per_prompt": args.tokens,
        "prompts": len(rows),
        "acceptance_by_depth": [a / c if c else 0.0 for a, c in zip(accepted, checked, strict=True)],
        "acceptance_rate": sum(accepted) / max(sum(checked), 1),
        # the first token of each prompt comes from the prompt's own pass
        "tokens_per_pass": (tokens - len(rows)) / sum(r["rounds"] for r in rows),
        "plain_tokens_per_s": tokens / sum(plain_s),
        "speculative_tokens_per_s": tokens / sum(spec_s),
        "speedup": sum(plain_s) / sum(spec_s),
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
