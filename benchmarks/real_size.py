"""Real-size quantized models on this machine: the published configs of gpt-oss-20b (routed experts in MXFP4, the
rest bf16, as it ships) and Qwen3-30B-A3B (routed experts 4-bit, the rest 8-bit, embedding bf16), random weights
written straight into those formats (moekit.quant.quantize.random_checkpoint), loaded by moekit in a fresh process
as a user on this CPU would (fp32 for what stays float; gpt-oss's bf16 attention and head quantized to 8-bit while
loading, since fp32 copies of them would not fit in 24 GB) and decoded at batch 1.

Reported: the files' size, the peak resident memory of loading (VmHWM) against what the loaded model holds, decode
tok/s (a 16-token prompt, then per-token time = (time for N new tokens - time for 1) / (N - 1)) against the floor:
the bytes one decode step must read in the loaded model's own formats (every weight but the embedding table and the
routed experts, top-k experts per MoE layer, the KV cache) over the read bandwidth measured in the same process.

    python benchmarks/real_size.py [--models gpt-oss-20b qwen3-30b-a3b] [--dir DIR] [--tokens 32] [--json FILE]

Needs about 20 GB free on disk for the larger model (one model's files at a time, removed after it; --dir keeps
them and reuses them on the next run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

MODELS = {  # published config: (the files' --weights, from_pretrained's quantize)
    "gpt-oss-20b": ("experts=mxfp4,rest=bf16", "rest=q8"),
    "qwen3-30b-a3b": ("experts=q4,rest=q8,embedding=bf16", None),
}
WRITE = """
from moekit.config.published import load_hf_config
from moekit.quant.quantize import random_checkpoint
random_checkpoint(load_hf_config({name!r}), {path!r}, {weights!r})
"""
PROMPT = 16

# Runs in a fresh process: its peak memory is the loading's alone.
MEASURE = r"""
import json, re, sys, time
import torch, moekit
sys.path.insert(0, {bench!r})
from common import read_bandwidth
from moekit.experts.quantized import QuantizedExperts
from moekit.experts.weights import ExpertWeights
from moekit.infer.fast import prepare_inference
from moekit.kernels.build import kernel_taking
from moekit.plan.model_stats import model_stats

kb = lambda key: int(re.search(key + r':\s+(\d+) kB', open('/proc/self/status').read())[1]) * 1024
def nbytes(module):  # tied tensors once
    unique = {{t.data_ptr(): t for t in module.state_dict().values()}}
    return sum(t.numel() * t.element_size() for t in unique.values())
kernel_taking()  # built (or found) before anything is measured
open('/proc/self/clear_refs', 'w').write('5')
before, start = kb('VmRSS'), time.perf_counter()
model = moekit.from_pretrained({path!r}, dtype=torch.float32, quantize={quantize!r})
load_s, peak = time.perf_counter() - start, kb('VmHWM') - before
held = nbytes(model)
experts = [m for m in model.modules() if isinstance(m, (QuantizedExperts, ExpertWeights))]
expert_bytes = sum(nbytes(m) for m in experts)
read_experts = sum(nbytes(m) * model.config.moe.top_k / m.num_experts for m in experts)
embedding = 0 if model.config.tie_embeddings else nbytes(model.embed_tokens)
kv = model_stats(model.config).kv_bytes_per_token(model.embed_tokens.weight.element_size()) * ({prompt} + {tokens} // 2)
covered = prepare_inference(model)
prompt = torch.randint(0, model.config.vocab_size, (1, {prompt}), generator=torch.Generator().manual_seed(0))
def timed(n):
    t = time.perf_counter()
    model.generate(prompt, n)
    return time.perf_counter() - t
with torch.no_grad():
    timed(2)
    one = min(timed(1) for _ in range(3))
    full = [timed({tokens}) for _ in range(2)]
print(json.dumps(dict(
    load_s=load_s, peak_growth_bytes=peak, held_bytes=held, rss_bytes=kb('VmRSS'),
    decode_s=(min(full) - one) / ({tokens} - 1), decode_runs_s=full, one_token_s=one, bandwidth=read_bandwidth(),
    floor_bytes=read_experts + held - expert_bytes - embedding + kv, expert_bytes_per_token=read_experts, kv_bytes=kv,
    fused=covered,
)))
"""


def run(name: str, directory: Path, tokens: int) -> dict:
    """Write (in a process of its own, whose memory goes with it), then measure in a fresh one."""
    path, (weights, quantize) = directory / name, MODELS[name]
    written_s = None
    if not (path / "config.json").is_file():
        print(f"{name}: writing random weights ({weights}) to {path}", file=sys.stderr)
        start = time.perf_counter()
        _python(name, WRITE.format(name=name, path=str(path), weights=weights))
        written_s = time.perf_counter() - start
    file_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    bench = str(Path(__file__).parent)
    code = MEASURE.format(bench=bench, path=str(path), quantize=quantize, prompt=PROMPT, tokens=tokens)
    print(f"{name}: loading (quantize={quantize}) and decoding in a fresh process", file=sys.stderr)
    result = json.loads(_python(name, code).strip().splitlines()[-1])
    return {"weights": weights, "quantize": quantize, "file_bytes": file_bytes, "write_s": written_s, **result}


def _python(name: str, code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: the process failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dir", help="where the checkpoints are written and kept (default: a temporary directory)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per decode run (32)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {}
    for name in args.models:
        directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="moekit-real-"))
        try:
            results[name] = run(name, directory, args.tokens)
        finally:
            if not args.dir:
                shutil.rmtree(directory, ignore_errors=True)
        r = results[name]
        floor_s = r["floor_bytes"] / r["bandwidth"]
        print(
            f"{name}: files {r['file_bytes'] / 1e9:.2f} GB, held {r['held_bytes'] / 1e9:.2f} GB, loading peak "
            f"+{r['peak_growth_bytes'] / 1e9:.2f} GB ({r['peak_growth_bytes'] / r['held_bytes']:.2f}x held) in "
            f"{r['load_s']:.0f} s; decode {1 / r['decode_s']:.1f} tok/s, floor {1 / floor_s:.1f} tok/s "
            f"({r['decode_s'] / floor_s:.2f}x the floor; {r['floor_bytes'] / 1e9:.2f} GB a token at "
            f"{r['bandwidth'] / 1e9:.1f} GB/s)"
        )
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "models": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
