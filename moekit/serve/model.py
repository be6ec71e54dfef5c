"""What the server serves: the engine over a loaded model, its tokenizer and chat template, its name and the
sampling defaults its directory ships (generation_config.json, as vLLM applies them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moekit.infer.tokenizers import Tokenizer, load_tokenizer
from moekit.serve.chat_template import ChatTemplate, load_chat_template
from moekit.serve.chat_template import read_json_object as _json
from moekit.serve.engine import Engine


@dataclass
class ServedModel:
    engine: Engine
    tokenizer: Tokenizer
    name: str
    chat_template: ChatTemplate | None = None
    defaults: dict = field(default_factory=dict)  # temperature, top_p, top_k from generation_config.json
    stop_token_ids: tuple[int, ...] = ()

    @property
    def context(self) -> int:
        return self.engine.context


def serve_directory(
    model, directory: str | Path, name: str, max_batch: int, context: int, max_queue: int, prefill_chunk: int
) -> ServedModel:
    """A loaded model with what its directory ships beside the weights."""
    directory = Path(directory)
    engine = Engine(model, max_batch=max_batch, context=context, max_queue=max_queue, prefill_chunk=prefill_chunk)
    generation = _json(directory / "generation_config.json")
    defaults = {
        k: generation[k] for k in ("temperature", "top_p", "top_k") if isinstance(generation.get(k), int | float)
    }
    eos = generation.get("eos_token_id", _json(directory / "config.json").get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()
    tokenizer = load_tokenizer(directory, model.config.vocab_size)
    return ServedModel(engine, tokenizer, name, load_chat_template(directory), defaults, eos_ids)
