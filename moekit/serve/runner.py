"""The engine on its own thread, so the server's event loop never runs model math: requests go in from the loop,
each token comes back to the request's asyncio queue."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from moekit.serve.engine import Engine, Request, SamplingParams, TokenEvent

log = logging.getLogger("moekit.serve")


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stopping = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        # a step's tokens for every request, handed to the event loop at once after the step: one wake-up (a
        # syscall, costly right after streaming weights) per step instead of one per request
        self._outbox: list[tuple[asyncio.Queue, TokenEvent | BaseException]] = []
        self._thread = threading.Thread(target=self._loop, name="moekit-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:  # a bug must not kill the thread silently: fail what runs, keep serving
                log.exception("engine step failed")
                self.engine.fail_all(e)
            if self._outbox:
                batch, self._outbox = self._outbox, []
                self._event_loop.call_soon_threadsafe(_deliver, batch)

    def submit(self, prompt: list[int], params: SamplingParams) -> Generation:
        """Queue a generation (ValueError, QueueFull as Engine.add); call from the event loop."""
        self._event_loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request = Request(prompt, params, lambda event: self._outbox.append((queue, event)))
        self.engine.add(request)
        self._wake.set()
        return Generation(self.engine, request, queue)


def _deliver(batch: list[tuple[asyncio.Queue, TokenEvent | BaseException]]) -> None:
    for queue, event in batch:
        queue.put_nowait(event)


class Generation:
    """One request's tokens as they come (async iteration), ending with the one that carries finish_reason."""

    def __init__(self, engine: Engine, request: Request, queue: asyncio.Queue):
        self.engine, self.request, self.queue = engine, request, queue

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self.queue.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Stop generating (the client left, or a stop string ended the text): frees the slot."""
        self.engine.cancel(self.request)
