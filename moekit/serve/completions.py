"""The OpenAI completion endpoints over the engine: prompts in (text, token ids, chat messages through the chat
template), choices out, whole or streamed as Server-Sent Events exactly as OpenAI sends them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from moekit.serve.chat_template import TemplateError
from moekit.serve.engine import QueueFull, SamplingParams, TokenEvent
from moekit.serve.metrics import ServerMetrics
from moekit.serve.model import ServedModel
from moekit.serve.protocol import ApiError, CompletionRequest, Message, _Sampling
from moekit.serve.runner import EngineRunner, Generation
from moekit.serve.text import ChoiceText

log = logging.getLogger("moekit.serve")


@dataclass
class Choice:
    """One choice being generated: its engine request, its text, what it produced."""

    index: int
    prompt_tokens: int
    generation: Generation
    text: ChoiceText
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    last_time: float | None = None


class Completions:
    def __init__(self, served: ServedModel, runner: EngineRunner, metrics: ServerMetrics):
        self.served, self.runner, self.metrics = served, runner, metrics

    # ---- requests in

    def chat_prompt(self, messages: list[Message], template_kwargs: dict | None = None) -> list[int]:
        template = self.served.chat_template
        if template is None:
            raise ApiError(
                400,
                "This model has no chat template (chat_template.jinja or tokenizer_config.json's chat_template): "
                "use /v1/completions, or give the model directory a template.",
                "messages",
            )
        try:
            if not messages:
                raise TemplateError("messages is empty: allowed at least one message")
            text = template.render([m.as_template_input() for m in messages], **(template_kwargs or {}))
        except TemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        return self.served.tokenizer.encode(text, add_special_tokens=False)

    def prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            texts: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            texts = [p]
        else:
            texts = list(p)
        out, vocab = [], self.served.engine.model.config.vocab_size
        for item in texts:
            ids = item if isinstance(item, list) else self.served.tokenizer.encode(item)
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(
                    400, f"prompt holds token ids outside the vocabulary: allowed [0, {vocab - 1}]", "prompt"
                )
            out.append(ids)
        if not out or any(not ids for ids in out):
            raise ApiError(400, "prompt is empty: allowed at least one token", "prompt")
        return out

    def params(self, body: _Sampling, prompt_len: int, max_tokens: int | None, logprobs: int | None, param: str):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise ApiError(400, f"{name}={getattr(body, name)} is not supported: allowed 0", name)
        context = self.served.context
        if max_tokens is None:
            max_tokens = max(context - prompt_len, 1)
        if prompt_len + max_tokens > context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} in the completion). "
                f"Please reduce the length of the {param} or completion.",
                param,
                "context_length_exceeded",
            )
        d = self.served.defaults
        temperature = body.temperature if body.temperature is not None else d.get("temperature", 1.0)
        top_p = body.top_p if body.top_p is not None else d.get("top_p", 1.0)
        top_k = body.top_k if body.top_k is not None else d.get("top_k", 0)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=max(int(top_k), 0),
            seed=body.seed,
            logprobs=logprobs,
            stop_token_ids=() if body.ignore_eos else self.served.stop_token_ids,
        )

    def start(self, prompts: list[list[int]], params: list[SamplingParams], n: int, stops: list[str]) -> list[Choice]:
        """Queue every choice: n per prompt (seeds seed, seed + 1, ... so they differ and each repeats), choice
        index i * n + j; none when the queue is full (503 for the client, who retries)."""
        choices: list[Choice] = []
        try:
            for prompt, p0 in zip(prompts, params, strict=True):
                for j in range(n):
                    p = replace(p0, seed=p0.seed + j) if p0.seed is not None and j else p0
                    text = ChoiceText(self.served.tokenizer, stops)
                    choices.append(Choice(len(choices), len(prompt), self.runner.submit(prompt, p), text))
        except (QueueFull, ValueError) as e:
            for c in choices:
                c.generation.cancel()
            if isinstance(e, QueueFull):
                raise ApiError(
                    503, f"The server is overloaded: {e}.", code="queue_full", headers={"Retry-After": "1"}
                ) from None
            raise ApiError(400, str(e)) from None
        return choices

    # ---- tokens out

    async def events(self, choices: list[Choice]) -> AsyncIterator[tuple[Choice, str]]:
        """(choice, new text) as tokens come from all choices; a choice's finish_reason is set on its last one. On
        exit (done, error, or the client gone) every unfinished choice is cancelled and its slot freed."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice):
            try:
                async for event in choice.generation:
                    await queue.put((choice, event))
            except Exception as e:
                await queue.put((choice, e))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        pending = len(choices)
        try:
            while pending:
                choice, event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                if choice.finish_reason is not None:  # in flight before a stop string's cancel took effect
                    continue
                text = self._take(choice, event)
                if choice.finish_reason is not None:
                    pending -= 1
                yield choice, text
        finally:
            for task in tasks:
                task.cancel()
            for c in choices:
                if c.finish_reason is None:
                    c.generation.cancel()

    def _take(self, choice: Choice, event: TokenEvent) -> str:
        now = time.monotonic()
        if choice.last_time is not None:
            self.metrics.itl.observe(now - choice.last_time)
        choice.last_time = now
        choice.tokens.append(event.token)
        if event.logprob is not None:
            choice.logprobs.append(event)
        text = choice.text.push(event.token)
        if event.finish_reason is not None and not choice.text.stopped:
            text += choice.text.flush()
        if choice.text.stopped:  # a stop string: the engine may not know yet
            choice.finish_reason = "stop"
            choice.generation.cancel()
        elif event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
        if choice.finish_reason is not None:
            req = choice.generation.request
            self.metrics.on_finish(choice.finish_reason, req.arrival, req.first_token_time, req.admitted, now)
        return text

    def usage(self, choices: list[Choice], prompt_tokens: int) -> dict:
        completion = sum(len(c.tokens) for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    def token_text(self, token: int) -> str:
        return self.served.tokenizer.decode([token])


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def log_ignored(body) -> None:
    if body.model_extra:
        log.info("fields %s are present in the request but ignored", sorted(body.model_extra))
