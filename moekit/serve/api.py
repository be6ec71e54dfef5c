"""The HTTP API (FastAPI): OpenAI's /v1/completions, /v1/chat/completions and /v1/models, vLLM's /tokenize and
/detokenize, /health and /metrics. Errors are OpenAI's envelope with 400 (never FastAPI's 422), 401, 404, 503;
a client that disconnects cancels its generation, streamed or not."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.serve.completions import Choice, Completions, log_ignored, new_id, sse
from moekit.serve.metrics import ServerMetrics
from moekit.serve.model import ServedModel
from moekit.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from moekit.serve.runner import EngineRunner

log = logging.getLogger("moekit.serve")
PUBLIC = ("/health", "/metrics", "/docs", "/openapi.json")


class ServerState:
    """Loading (503 on /health), ready, or draining (503: a SIGTERM arrived; running requests finish)."""

    def __init__(self):
        self.status = "loading"
        self.error: BaseException | None = None  # why loading failed
        self.on_failed = None  # called when loading fails (the server stops: nothing could ever be served)
        self.served: ServedModel | None = None
        self.runner: EngineRunner | None = None
        self.metrics: ServerMetrics | None = None
        self.completions: Completions | None = None

    def ready(self, served: ServedModel) -> None:
        self.served = served
        self.runner = EngineRunner(served.engine)
        self.metrics = ServerMetrics(served.engine, served.name)
        served.engine.on_step = self.metrics.on_step
        self.completions = Completions(served, self.runner, self.metrics)
        self.runner.start()
        self.status = "ready"


def build_app(load: Callable[[], ServedModel], api_key: str | None = None) -> tuple[FastAPI, ServerState]:
    """The app and its state; `load` runs on a thread at startup (the model loads while /health says 503)."""
    state = ServerState()

    async def lifespan(app: FastAPI):
        task = asyncio.get_running_loop().run_in_executor(None, load)
        task.add_done_callback(lambda f: state.ready(f.result()) if not f.exception() else _load_failed(f, state))
        yield
        state.status = "draining"
        if state.runner is not None:
            state.runner.stop()

    app = FastAPI(title="moekit", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # unknown path, wrong method
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return JSONResponse(ApiError(400, f"{param or 'body'}: {first['msg']}", param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):  # a bug: logged, and still OpenAI's envelope
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key is not None and not request.url.path.startswith(PUBLIC):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    def ready() -> Completions:
        if state.status != "ready":
            raise ApiError(503, f"The server is {state.status}.", code="unavailable", headers={"Retry-After": "5"})
        return state.completions

    def check_model(name: str | None) -> None:
        if name is not None and name != state.served.name:
            raise ApiError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    @app.get("/health")
    async def health():
        if state.status != "ready":
            return JSONResponse(ApiError(503, f"The server is {state.status}.").body(), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        ready()
        served = state.served
        card = {
            "id": served.name,
            "object": "model",
            "created": 0,
            "owned_by": "moekit",
            "max_model_len": served.context,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        c = ready()
        check_model(body.model)
        if body.messages is not None:
            ids = c.chat_prompt(body.messages)
        elif body.prompt is not None:
            ids = state.served.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise ApiError(400, "prompt or messages is required", "prompt")
        return {"count": len(ids), "max_model_len": state.served.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        ready()
        check_model(body.model)
        vocab = state.served.engine.model.config.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise ApiError(400, f"tokens hold ids outside the vocabulary: allowed [0, {vocab - 1}]", "tokens")
        return {"prompt": state.served.tokenizer.decode(body.tokens)}

    def begin(body: CompletionRequest | ChatCompletionRequest) -> Completions:
        """What every completion request goes through first."""
        c = ready()
        check_model(body.model)
        log_ignored(body)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
        return c

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        c = begin(body)
        prompts = c.prompts(body)
        params = [c.params(body, len(ids), body.max_tokens, body.logprobs, "prompt") for ids in prompts]
        choices = c.start(prompts, params, body.n, body.stops())
        prompt_tokens = sum(len(ids) for ids in prompts)
        rid, created = new_id("cmpl"), int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": state.served.name}
        echoes = [state.served.tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in range(body.n)]

        def logprobs(choice: Choice, events) -> dict | None:
            if body.logprobs is None:
                return None
            tokens = [c.token_text(e.token) for e in events]
            return {
                "tokens": tokens,
                "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{c.token_text(t): lp for t, lp in (e.top or [])} for e in events],
                "text_offset": [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))],
            }

        if body.stream:

            async def chunks():
                for choice, echo in zip(choices, echoes, strict=True):
                    if echo:
                        yield [_text_choice(choice.index, echo, None, None)]
                async with aclosing(c.events(choices)) as events:
                    async for choice, text in events:
                        if text or choice.finish_reason:
                            lp = logprobs(choice, choice.logprobs[-1:])
                            yield [_text_choice(choice.index, text, lp, choice.finish_reason)]

            return _sse_response(_event_stream(chunks(), head, body, lambda: c.usage(choices, prompt_tokens)))

        texts = await _unless_disconnected(request, _texts(c, choices))
        out = [
            _text_choice(ch.index, echoes[ch.index] + texts[ch.index], logprobs(ch, ch.logprobs), ch.finish_reason)
            for ch in choices
        ]
        return {**head, "choices": out, "usage": c.usage(choices, prompt_tokens)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        c = begin(body)
        prompt = c.chat_prompt(body.messages, body.chat_template_kwargs)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        p = c.params(body, len(prompt), max_tokens, top, "messages")
        choices = c.start([prompt], [p], body.n, body.stops())
        rid, created = new_id("chatcmpl"), int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.served.name}

        def token_logprob(event) -> dict:
            text = c.token_text(event.token)
            entry = {"token": text, "logprob": event.logprob, "bytes": list(text.encode())}
            entry["top_logprobs"] = [
                {"token": c.token_text(t), "logprob": lp, "bytes": list(c.token_text(t).encode())}
                for t, lp in (event.top or [])
            ]
            return entry

        if body.stream:

            async def chunks():
                for choice in choices:
                    yield [_delta(choice.index, {"role": "assistant", "content": ""}, None, None)]
                async with aclosing(c.events(choices)) as events:
                    async for choice, text in events:
                        if text:
                            lp = None
                            if body.logprobs:
                                lp = {"content": [token_logprob(e) for e in choice.logprobs[-1:]]}
                            yield [_delta(choice.index, {"content": text}, lp, None)]
                        if choice.finish_reason is not None:
                            yield [_delta(choice.index, {}, None, choice.finish_reason)]

            return _sse_response(_event_stream(chunks(), head, body, lambda: c.usage(choices, len(prompt))))

        texts = await _unless_disconnected(request, _texts(c, choices))
        out = []
        for ch in choices:
            lp = {"content": [token_logprob(e) for e in ch.logprobs]} if body.logprobs else None
            message = {"role": "assistant", "content": texts[ch.index]}
            out.append({"index": ch.index, "message": message, "logprobs": lp, "finish_reason": ch.finish_reason})
        return {**head, "object": "chat.completion", "choices": out, "usage": c.usage(choices, len(prompt))}

    return app, state


async def _event_stream(chunks, head: dict, body, usage) -> AsyncIterator[str]:
    """Server-Sent Events as OpenAI sends them: each chunk's choices under the response's head, the usage chunk
    when asked for, an error after the 200 as an {"error": ...} chunk, then [DONE]."""
    try:
        async for choices in chunks:
            yield sse({**head, "choices": choices})
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage()})
    except Exception as e:  # after the 200: the error goes as a chunk, as OpenAI's clients expect
        log.exception("generation failed")
        yield sse(ApiError(500, f"generation failed: {e}").body())
    yield sse("[DONE]")


async def _texts(c: Completions, choices: list[Choice]) -> dict[int, str]:
    """Each choice's whole text."""
    texts = {ch.index: "" for ch in choices}
    async with aclosing(c.events(choices)) as events:
        async for choice, text in events:
            texts[choice.index] += text
    return texts


def _text_choice(index: int, text: str, logprobs, finish_reason) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _delta(index: int, delta: dict, logprobs, finish_reason) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


class _EventStream(StreamingResponse):
    """Closes its event generator however the response ends: a disconnect cancels the sending task wherever it
    waits, and a generator left suspended would free its slots only when garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse_response(body) -> StreamingResponse:
    return _EventStream(body, media_type="text/event-stream; charset=utf-8", headers={"Cache-Control": "no-cache"})


async def _unless_disconnected(request: Request, work):
    """Run work unless the client disconnects first (then work is cancelled, which frees its slots): Starlette
    watches disconnects only for streamed responses."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(disconnected())
    done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task not in done:
        task.cancel()
        raise asyncio.CancelledError("client disconnected")
    watch.cancel()
    return task.result()


def _load_failed(future, state: ServerState) -> None:
    state.status, state.error = "failed", future.exception()
    log.error("loading the model failed: %s", state.error)
    if state.on_failed is not None:
        state.on_failed()
