"""`moekit serve`: an OpenAI-compatible HTTP server with continuous batching over a model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moekit.cli.loading import add_loading_arguments, load_model


def run(args: argparse.Namespace) -> int:
    try:
        from moekit.serve.server import run_server
    except ImportError as e:
        raise ValueError(f"moekit serve needs its extras ({e.name} is missing): pip install 'moekit[serve]'") from None
    from moekit.checkpoint.files import checkpoint_dir
    from moekit.kernels import load_kernel
    from moekit.serve.model import serve_directory

    path = checkpoint_dir(args.checkpoint)
    name = args.served_model_name or Path(args.checkpoint).resolve().name  # a run's name, not its final/

    def load():
        model = load_model(path, args)
        load_kernel()  # a first build happens here, while /health says 503
        served = serve_directory(model, path, name, args.max_batch, args.context, args.max_queue, args.prefill_chunk)
        print(f"moekit serve: {name} ready on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        return served

    run_server(load, args.host, args.port, args.api_key, args.drain_timeout, args.log_level)
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, batching concurrent requests",
        description="Serve a Hugging Face model directory (or a moekit run) over OpenAI's API: /v1/completions, "
        "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, /metrics (Prometheus). Concurrent "
        "requests decode together in one batch, each expert read once per step for all of them.",
    )
    s.add_argument("checkpoint", help="model directory (config.json, *.safetensors, tokenizer.json) or a moekit run")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoding together (KV-cache slots; default 16)")
    s.add_argument("--context", type=int, default=2048, help="tokens per sequence, prompt included (default 2048)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 503 (default 256)")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per step (default 512)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (not /health, /metrics)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests get at SIGTERM")
    add_loading_arguments(s)  # --expert-memory: /metrics gains moekit:expert_cache_* series
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(fn=run)
