"""Experts beyond memory: moekit's expert cache (moekit.from_pretrained(..., expert_memory=)) against llama.cpp with
mmap (through llama-cpp-python) on the same weights, both under the same memory budget, from disk.

The model: random weights at a real model's expert shapes (fewer layers), written by transformers; llama.cpp reads
moekit's f32 GGUF export of the same files. The budget: the resident part (attention, norms, routers, embedding,
head) plus a quarter of the routed experts. moekit holds the rest of the experts in its checkpoint and reads them
with O_DIRECT (the page cache plays no part); llama.cpp maps its file, and a memory cgroup around its process with
the budget (+ SLACK for its process, KV cache and compute buffers) charges the mapped pages, so what does not fit
is read again from disk. The page cache of both files is dropped before every run.

Routing: the weights are random, so the routing is made realistic by the input: each decode step takes the next
token of real text (the standard library's source as bytes), as a trace of real text routes, rather than the
random model's own output. Every run starts cold (a new process, an empty pool), warms up on some tokens and is
timed on the next ones (STEPS). Hit rates count every step from cold and stand beside the simulator's replay of the same
routing (moekit cache-sim): LRU, LFU, LFU with decay and Belady's optimum at the same number of slots.

    python benchmarks/offload.py [--models qwen3 mixtral] [--rounds 2] [--json results.json] [--markdown]
    python benchmarks/offload.py --table benchmarks/results/offload.json --markdown

Needs llama-cpp-python and a writable memory cgroup (v1 or v2; run as root); about 2.2x the model's size on disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

VOCAB = 32000
SLACK = 256 * 2**20  # llama.cpp's process beside the mapped weights: interpreter, KV cache, compute buffers
STEPS = {"qwen3": (32, 96), "mixtral": (16, 32), "smoke": (32, 96)}  # tokens: warm-up, timed
SHAPES = {
    "qwen3": (
        "qwen3-like (Qwen3-30B-A3B's experts: D=2048, 128 experts top-8, F=768; 4 layers, 32/4 heads)",
        "qwen3_moe",
        dict(
            num_hidden_layers=4,
            hidden_size=2048,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            intermediate_size=6144,
            norm_topk_prob=True,
        ),
    ),
    "mixtral": (
        "mixtral-like (Mixtral-8x7B's experts: D=4096, 8 experts top-2, F=14336; 2 layers, 32/8 heads)",
        "mixtral",
        dict(
            num_hidden_layers=2,
            hidden_size=4096,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=14336,
        ),
    ),
}
SMOKE = (
    "smoke (a quick check of this script: 2 layers, D=256, 32 experts top-4, F=128)",
    "qwen3_moe",
    dict(
        num_hidden_layers=2,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        intermediate_size=512,
        norm_topk_prob=True,
    ),
)
CONFIGS = {  # label: (policy, prefetch)
    "lru": ("lru", "off"),
    "lfu-decay": ("lfu-decay", "off"),
    "lru + prefetch": ("lru", "on"),
    "lru + prefetch auto (default)": ("lru", "auto"),
}


def text_tokens(n: int) -> list[int]:
    """n tokens of real text: the words and punctuation of the standard library's documentation strings, each
    word hashed into the vocabulary (a word-level tokenizer: Zipf-distributed ids over the whole vocabulary, as a
    real tokenizer's are)."""
    import ast
    import re
    import zlib

    words: list[int] = []
    for module in ("argparse", "logging/__init__", "subprocess", "typing", "asyncio/events", "email/message"):
        tree = ast.parse(Path(ast.__file__).with_name(f"{module}.py").read_text())
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None
            words += [zlib.crc32(w.encode()) % VOCAB for w in re.findall(r"\w+|[^\w\s]", doc or "")]
            if len(words) >= n:
                return words[:n]
    raise SystemExit(f"benchmarks/offload.py: the standard library's docstrings gave {len(words)} words, not {n}")


def drop_page_cache(*paths: Path) -> None:
    for path in paths:
        for file in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
            fd = os.open(file, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def memory_cgroup(limit: int) -> Path:
    """A child memory cgroup (v2 or v1) of this process's own, limited to `limit` bytes (page cache included)."""
    own = Path("/proc/self/cgroup").read_text().splitlines()
    for line in own:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit_file = "memory.max"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file = "memory.limit_in_bytes"
        else:
            continue
        group = base / "moekit-offload-bench"
        try:
            group.mkdir(exist_ok=True)
            (group / limit_file).write_text(str(limit))
            return group
        except OSError:
            continue
    raise SystemExit("benchmarks/offload.py: no writable memory cgroup (run as root on a machine with cgroups)")


# ---- workers (one process per run: a cold start, and llama.cpp inside its cgroup) ----


def moekit_worker(args) -> dict:
    import moekit
    from moekit.infer.cache import KVCache
    from moekit.infer.fast import prepare_inference

    model = moekit.from_pretrained(
        args.model,
        dtype=torch.float32,
        expert_memory=args.budget,
        expert_policy=args.policy,
        prefetch={"on": True, "off": False, "auto": "auto"}[args.prefetch],
    )
    prepare_inference(model)
    warm, steps = STEPS[args.shape]
    cache, tokens = model.expert_cache, text_tokens(warm + steps)
    log: list = []
    if args.trace:
        acquire = cache.acquire
        cache.acquire = lambda layer, experts, n: log.append([layer, experts]) or acquire(layer, experts, n)
    kv, times = KVCache(), []
    with torch.no_grad():
        for token in tokens:
            start = time.perf_counter()
            model(torch.tensor([[token]]), cache=kv)
            times.append(time.perf_counter() - start)
    cache.drain()
    stats = cache.stats.summary()
    cache.close()
    return {
        "seconds": sum(times[warm:]),
        "slots": cache.slots,
        "stats": stats,
        "log": log,
        "direct": len(cache.reader.direct_files) > 0,
    }


def llama_worker(args) -> dict:
    (Path(args.cgroup) / "cgroup.procs").write_text(str(os.getpid()))
    import llama_cpp

    threads, (warm, steps) = torch.get_num_threads(), STEPS[args.shape]
    llm = llama_cpp.Llama(
        args.model,
        n_ctx=warm + steps + 8,
        n_batch=8,
        n_threads=threads,
        n_threads_batch=threads,
        use_mmap=True,
        use_mlock=False,
        verbose=False,
    )
    times = []
    for token in text_tokens(warm + steps):
        start = time.perf_counter()
        llm.eval([token])
        times.append(time.perf_counter() - start)
    return {"seconds": sum(times[warm:])}


def run_worker(kind: str, shape: str, model: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--shape", shape, "--model", str(model), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the benchmark ----


def build(name: str, directory: Path) -> tuple[Path, Path]:
    import transformers

    from moekit.checkpoint.gguf_export import export_gguf

    _, family, kw = {**SHAPES, "smoke": SMOKE}[name]
    source, gguf = directory / name, directory / f"{name}-f32.gguf"
    if not (source / "config.json").is_file():
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, max_position_embeddings=4096, **kw)
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(cfg)
        hf = hf.to_empty(device="cpu")
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(std=0.02)
            for n, p in hf.named_parameters():
                if "norm" in n:
                    p.fill_(1.0)
        hf.save_pretrained(source)
        del hf
    if not gguf.is_file():
        export_gguf(source, gguf, "f32")
    return source, gguf


def measure(name: str, directory: Path, rounds: int, keep: bool) -> dict:
    import moekit
    from moekit.infer.expert_cache import resident_bytes
    from moekit.infer.expert_trace import ExpertTrace, simulate

    title = {**SHAPES, "smoke": SMOKE}[name][0]
    source, gguf = build(name, directory)
    probe = moekit.from_pretrained(source, dtype=torch.float32, expert_memory=2**50)
    blocks = probe.moe_blocks()
    expert = next(iter(blocks.values())).experts.expert_bytes()
    total = sum(b.experts.num_experts for b in blocks.values())
    resident = resident_bytes(probe)
    probe.expert_cache.close()
    del probe
    budget = resident + (total // 4) * expert
    group = memory_cgroup(budget + SLACK)
    runs: dict[str, list[dict]] = {}
    for r in range(rounds):
        for label, (policy, prefetch) in CONFIGS.items():
            drop_page_cache(source)
            extra = ["--budget", str(budget), "--policy", policy, "--prefetch", prefetch]
            extra += ["--trace"] if r == 0 and label == "lru" else []
            runs.setdefault(label, []).append(run_worker("moekit", name, source, extra))
        drop_page_cache(gguf)
        runs.setdefault("llama.cpp mmap", []).append(run_worker("llama", name, gguf, ["--cgroup", str(group)]))
    group.rmdir()
    if not keep:  # the next model needs the disk
        shutil.rmtree(source)
        gguf.unlink()
    # the simulator on the same routing (every step from cold; the first run's log)
    log = runs["lru"][0].pop("log")
    layers = sorted({layer for layer, _ in log})
    steps = [log[i : i + len(layers)] for i in range(0, len(log), len(layers))]
    ids = torch.tensor([[experts for _, experts in step] for step in steps])
    trace = ExpertTrace(ids, layers, total // len(layers), expert)
    slots = runs["lru"][0]["slots"]
    simulated = {p: simulate(trace, slots, p)["hit_rate"] for p in ("lru", "lfu", "lfu-decay", "belady")}
    rows = []
    for label, results in runs.items():
        tok_s = [STEPS[name][1] / x["seconds"] for x in results]
        row = {"engine": label, "tok_s": statistics.median(tok_s), "tok_s_all": tok_s}
        if "stats" in results[0]:
            s = results[0]["stats"]
            row.update(
                hit_rate=statistics.median(x["stats"]["hit_rate"] for x in results),
                mib_per_token=statistics.median(x["stats"]["bytes_per_token"] for x in results) / 2**20,
                read_gb_s=statistics.median(x["stats"]["read_gb_per_s"] for x in results),
                direct=results[0]["direct"],
            )
            if "prefetch_precision" in s:
                row.update(precision=s["prefetch_precision"], recall=s["prefetch_recall"], wasted=s["prefetch_wasted"])
            for x in results:
                x.pop("log", None)
        rows.append(row)
    return {
        "title": title,
        "budget_bytes": budget,
        "resident_bytes": resident,
        "expert_bytes": expert,
        "experts": total,
        "slots": slots,
        "cgroup_limit_bytes": budget + SLACK,
        "simulated_hit_rate": simulated,
        "rows": rows,
        "runs": runs,
    }


def markdown(results: dict) -> str:
    out = [f"Measured {results['date']} on {results['machine']}; {results['rounds']} rounds, medians.", ""]
    for r in results["models"].values():
        sim = r["simulated_hit_rate"]
        gib = 2**30
        out += [
            f"**{r['title']}**: budget {r['budget_bytes'] / gib:.2f} GiB (resident {r['resident_bytes'] / gib:.2f} GiB "
            f"+ {r['slots']} of {r['experts']} experts, {r['expert_bytes'] / 2**20:.1f} MiB each); simulated hit rates "
            f"on the same routing: LRU {sim['lru']:.1%}, LFU {sim['lfu']:.1%}, LFU-decay {sim['lfu-decay']:.1%}, "
            f"Belady {sim['belady']:.1%}.",
            "",
            "| engine | tok/s | hit rate | MiB read / token | prefetch precision / recall / wasted |",
            "|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            hit = f"{row['hit_rate']:.1%}" if "hit_rate" in row else "-"
            mib = f"{row['mib_per_token']:.0f}" if "mib_per_token" in row else "-"
            pre = f"{row['precision']:.0%} / {row['recall']:.0%} / {row['wasted']:.0%}" if "precision" in row else "-"
            out.append(f"| {row['engine']} | {row['tok_s']:.2f} | {hit} | {mib} | {pre} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=[*SHAPES, "smoke"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", help="where the models are written (kept; default: a temporary directory)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--table", help="print the table of an earlier --json file")
    parser.add_argument("--worker", choices=["moekit", "llama"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep each model's files (in --dir) after measuring it")
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="lru", help=argparse.SUPPRESS)
    parser.add_argument("--prefetch", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cgroup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((moekit_worker if args.worker == "moekit" else llama_worker)(args)))
        return
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(args.dir) if args.dir else Path(tmp)
        models = {name: measure(name, directory, args.rounds, args.keep) for name in args.models}
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "rounds": args.rounds,
        "tokens": {name: {"warm": STEPS[name][0], "timed": STEPS[name][1]} for name in args.models},
        "models": models,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(markdown(results) if args.markdown else json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
