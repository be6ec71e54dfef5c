"""A real moekit server on a loopback port for the tests: a tiny transformers-made model with a character-level
tokenizer.json (every token one character, so texts compare exactly) and a ChatML chat template."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn
from hf_tiny import hf_tiny_model

import moekit
from moekit.serve.api import build_app
from moekit.serve.model import ServedModel, serve_directory

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]  # 96 tokens: the tiny configs' vocabulary


def tiny_model_dir(directory: Path, family: str = "qwen3_moe", template: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models

    hf_tiny_model(family, directory)
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"eos_token": CHARS[2]}
    if template:
        config["chat_template"] = CHATML
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """build_app over `served` under uvicorn on a thread; url, served, model; stop() shuts it down."""

    def __init__(self, served: ServedModel, api_key: str | None = None):
        self.served, self.model = served, served.engine.model
        app, self.state = build_app(lambda: served, api_key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def alone(self, prompt_ids: list[int], max_tokens: int, **sampling) -> list[int]:
        """The model's own generate for this prompt alone, stopping at the served stop tokens as the server does."""
        eos = self.served.stop_token_ids[0] if self.served.stop_token_ids else None
        out = self.model.generate(torch.tensor([prompt_ids]), max_tokens, eos_token_id=eos, **sampling)
        return out[0, len(prompt_ids) :].tolist()

    def text(self, ids: list[int]) -> str:
        return self.served.tokenizer.decode(ids)


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become healthy")


def start_server(directory: Path, api_key: str | None = None, **engine) -> RunningServer:
    model = moekit.from_pretrained(directory).eval()
    settings = {"max_batch": 4, "context": 128, "max_queue": 64, "prefill_chunk": 16, **engine}
    return RunningServer(serve_directory(model, directory, "tiny", **settings), api_key)
