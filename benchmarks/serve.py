"""Serving throughput and latency: `moekit serve` against the servers users would run instead, on the same random
weights (the mixtral-like and qwen3-like models of benchmarks/generate.py), over real HTTP on loopback.

Closed loop: C clients each send a streamed completion (a 64-token prompt of random ids, 64 new tokens, greedy,
end-of-sequence ignored) and send the next when it ends; reported per concurrency C: aggregate output tok/s (output
tokens / wall time), time to first token (TTFT) p50/p99, time per output token (TPOT = (end - first) / (tokens - 1)
per request) p50/p99, and moekit's expert-batching factor (token-expert assignments per distinct expert read, from
its /metrics). Open loop: requests arrive as a Poisson process at a fixed rate for a fixed time.

Peers, each where it runs here, on the same weights exported to an F32 GGUF by moekit export-gguf: llama.cpp's own
server (`llama-server -np N --cont-batching`, N = the largest concurrency; the binary from $LLAMA_SERVER, built
from the llama.cpp source llama-cpp-python vendors) and llama-cpp-python's server (`python -m llama_cpp.server`,
which runs one request at a time); and `transformers serve --continuous-batching` on the directory.

    python benchmarks/serve.py [--models qwen3 mixtral] [--concurrency 1 4 16 64] [--peers llama.cpp transformers]
                               [--rate 2 --duration 30] [--json results.json] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402
from generate import COMMON, MODELS  # noqa: E402

PROMPT, OUTPUT = 64, 64
LLAMA_SERVER = os.environ.get("LLAMA_SERVER", "llama-server")  # llama.cpp's server binary


def make_model(name: str, directory: Path) -> Path:
    """The random transformers model, saved with a tokenizer.json whose every token is one distinct piece."""
    import torch
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    _, family, kw = MODELS[name]
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(family, **COMMON, **kw)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(directory)
    # a piece per token ("<0>" .. "<31999>", each a whole word): a text prompt is exactly its ids for every server
    vocab = {f"<{i}>": i for i in range(cfg.vocab_size)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\d+>"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    return directory


class Server:
    """A server process on a loopback port: started, waited for, stopped."""

    def __init__(self, command: list[str], port: int, ready_path: str, log: Path):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log, self.log_path = log.open("w"), log
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                tail = log.read_text().strip().splitlines()[-3:]
                raise RuntimeError(f"{Path(command[0]).name} exited with {self.proc.returncode}: {' / '.join(tail)}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{command[:3]} did not come up: see {log}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url, json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                tokens += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    tpot = (end - first) / max(tokens - 1, 1) if first else 0.0
    return {"ttft": (first or end) - start, "tokens": tokens, "tpot": tpot}


def request_body(model: str, prompt: list[int], extra: dict) -> dict:
    """A streamed greedy completion; the prompt as token ids, or as its text where a server takes text only."""
    extra = dict(extra)
    text, model = extra.pop("text_prompt", False), extra.pop("model", model)
    prompt_field = "".join(f"<{i}>" for i in prompt) if text else prompt
    return {"model": model, "prompt": prompt_field, "max_tokens": OUTPUT, "temperature": 0, "stream": True, **extra}


def _client(connections: int) -> httpx.AsyncClient:
    # a new connection per request: llama-server closes idle keep-alive connections under the client
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=connections, max_keepalive_connections=0))


async def closed_loop(
    url: str, model: str, concurrency: int, requests: int, extra: dict, vocab: int, seed: int = 0
) -> dict:
    rng = random.Random(1000 * seed + concurrency)  # prompts no level repeats (servers cache prompt prefixes)
    todo = [[rng.randrange(vocab) for _ in range(PROMPT)] for _ in range(requests)]
    results = []
    async with _client(concurrency + 4) as client:

        async def worker():
            while todo:
                prompt = todo.pop()
                results.append(await one_request(client, url, request_body(model, prompt, extra)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize(results, wall)


async def open_loop(url: str, model: str, rate: float, duration: float, extra: dict, vocab: int) -> dict:
    rng = random.Random(0)
    # a new connection per request: llama-server closes idle keep-alive connections under the client
    async with _client(1000) as client:
        tasks, start = [], time.perf_counter()
        while time.perf_counter() - start < duration:
            prompt = [rng.randrange(vocab) for _ in range(PROMPT)]
            tasks.append(asyncio.create_task(one_request(client, url, request_body(model, prompt, extra))))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"rate": rate, **summarize(list(results), wall)}


def summarize(results: list[dict], wall: float) -> dict:
    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "seconds": wall,
        "output_tok_s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": statistics.median(tpot) if tpot else None,
        "tpot_p99": pct(tpot, 0.99) if tpot else None,
    }


def expert_counters(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for name in ("moekit:expert_assignments_total", "moekit:expert_reads_total"):
        match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
        values[name] = float(match.group(1)) if match else 0.0
    return values["moekit:expert_assignments_total"], values["moekit:expert_reads_total"]


def start(kind: str, directory: Path, port: int, max_batch: int, tmp: Path) -> tuple[Server, dict]:
    """A server of `kind` over the model and the extra request fields that make it generate every token."""
    python = sys.executable
    if kind == "moekit":
        command = [python, "-m", "moekit", "serve", str(directory), "--port", str(port), "--served-model-name", "m"]
        command += ["--max-batch", str(max_batch), "--context", str(2 * (PROMPT + OUTPUT)), "--log-level", "warning"]
        return Server(command, port, "/health", tmp / "moekit.log"), {"ignore_eos": True}
    if kind == "llama.cpp":
        gguf = _gguf(directory, tmp)
        threads = str(os.cpu_count())
        command = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--model_alias", "m"]
        command += ["--n_ctx", str(2 * (PROMPT + OUTPUT)), "--n_threads", threads, "--n_batch", "512"]
        eos = json.loads((directory / "config.json").read_text()).get("eos_token_id")
        extra = {"logit_bias": {str(eos): -100}} if isinstance(eos, int) else {}
        return Server(command, port, "/v1/models", tmp / "llama.log"), extra
    if kind == "llama-server":  # llama.cpp's own server, built from the source llama-cpp-python vendors
        gguf = _gguf(directory, tmp)
        slots = str(max_batch)
        command = [LLAMA_SERVER, "--model", str(gguf), "--port", str(port), "--alias", "m", "-np", slots, "-t", "2"]
        command += ["-c", str(max_batch * 2 * (PROMPT + OUTPUT)), "--cont-batching", "-b", "512", "--no-warmup"]
        return Server(command, port, "/health", tmp / "llama-server.log"), {"ignore_eos": True}
    if kind == "transformers":
        command = [str(Path(python).parent / "transformers"), "serve", str(directory), "--port", str(port)]
        command += ["--continuous-batching"]
        extra = {"text_prompt": True, "model": str(directory)}  # it serves the directory under its path
        return Server(command, port, "/health", tmp / "transformers.log"), extra
    raise ValueError(kind)


def _gguf(directory: Path, tmp: Path) -> Path:
    """The model as one F32 GGUF file (moekit export-gguf), written once."""
    gguf = tmp / f"{directory.name}.gguf"
    if not gguf.exists():
        command = [sys.executable, "-m", "moekit", "export-gguf", str(directory), str(gguf), "--type", "f32"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return gguf


def measure(kind: str, name: str, directory: Path, args, tmp: Path) -> dict:
    port = 8100 + hash(kind) % 500
    vocab = COMMON["vocab_size"]
    out: dict = {"closed": {}}
    try:
        server, extra = start(kind, directory, port, max(args.concurrency), tmp)
    except (RuntimeError, TimeoutError, OSError, subprocess.CalledProcessError) as e:
        out["error"] = str(e)[:500]
        print(f"  {kind} {name}: {out['error']}", file=sys.stderr)
        return out
    url = f"{server.url}/v1/completions"
    try:
        asyncio.run(closed_loop(url, "m", 1, 2, extra, vocab, seed=1))  # warm-up: kernels, caches
        for c in args.concurrency:
            before = expert_counters(server.url) if kind == "moekit" else None
            level = closed_loop(url, "m", c, max(2 * c, args.min_requests), extra, vocab)
            try:
                row = asyncio.run(asyncio.wait_for(level, args.level_timeout))
            except TimeoutError:
                out["closed"][str(c)] = {"timed_out": args.level_timeout}
                print(f"  {kind} {name} C={c}: over {args.level_timeout:.0f} s, higher levels skipped", file=sys.stderr)
                break
            if before is not None:
                after = expert_counters(server.url)
                reads = after[1] - before[1]
                row["expert_batching_factor"] = (after[0] - before[0]) / reads if reads else None
            out["closed"][str(c)] = row
            print(f"  {kind} {name} C={c}: {row['output_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        if args.rate:
            out["open"] = asyncio.run(open_loop(url, "m", args.rate, args.duration, extra, vocab))
    except Exception as e:  # a peer that does not run here is reported, not fatal
        log_tail = " / ".join(server.log_path.read_text().strip().splitlines()[-3:])
        out["error"] = f"{type(e).__name__}: {e} (log: {log_tail})"[:800]
        print(f"  {kind} {name}: {out['error']}", file=sys.stderr)
    finally:
        server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen3", "mixtral"], choices=list(MODELS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--min-requests", type=int, default=8, help="requests per level at least (default 8)")
    parser.add_argument("--peers", nargs="*", default=["llama-server", "llama.cpp", "transformers"])
    parser.add_argument("--level-timeout", type=float, default=240.0, help="seconds one level may take (240)")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: Poisson requests/s (0: skip)")
    parser.add_argument("--duration", type=float, default=30.0, help="open loop: seconds of arrivals")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            directory = make_model(name, Path(tmp) / name)
            rows = {kind: measure(kind, name, directory, args, Path(tmp)) for kind in ["moekit", *args.peers]}
            report["models"][name] = {"title": MODELS[name][0], "servers": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print_table(report, args.markdown)


def print_table(report: dict, markdown: bool) -> None:
    print(f"{report['date']}, {report['machine']}, prompt {PROMPT} + {OUTPUT} new tokens per request")
    header = "| model | server | C | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | expert batching |"
    print(header if markdown else header.replace("|", " "))
    if markdown:
        print("|---" * 7 + "|")
    for model in report["models"].values():
        for kind, result in model["servers"].items():
            if "error" in result and not result["closed"]:
                print(f"| {model['title']} | {kind} | - | does not run here: {result['error'][:80]} | | | |")
                continue
            for c, r in result["closed"].items():
                if "timed_out" in r:
                    print(f"| {model['title'].split(' (')[0]} | {kind} | {c} | over {r['timed_out']:.0f} s | | | |")
                    continue
                tpot = f"{1e3 * r['tpot_p50']:.0f} / {1e3 * r['tpot_p99']:.0f}" if r["tpot_p50"] else "-"
                factor = r.get("expert_batching_factor")
                cells = [
                    model["title"].split(" (")[0],
                    kind,
                    c,
                    f"{r['output_tok_s']:.1f}",
                    f"{1e3 * r['ttft_p50']:.0f} / {1e3 * r['ttft_p99']:.0f}",
                    tpot,
                    f"{factor:.2f}" if factor else "-",
                ]
                print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
