"""The continuous-batching engine: requests join and leave the running batch at every step (iteration-level
scheduling, as Orca and vLLM). It knows token ids only, nothing of HTTP or text, and runs synchronously: `step()`
does one iteration; moekit.serve.runner drives it from a thread for the server.

One step: finished and cancelled sequences leave (their slots are compacted so the running ones stay in slots
0..n-1); waiting requests take free slots and are prefilled, `prefill_chunk` prompt tokens in all per step (whole
prompts that fit together as one batch, a longer one in chunks: a long prompt never stalls the running decodes for
more than one chunk); then every running sequence decodes one token, all in one batch through the model, so each
expert is read once per step for all the sequences that chose it. Each sequence has its own slot of the KV cache
(`context` tokens); a request waits while every slot is taken."""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moekit._validate import check_int
from moekit.infer.fast import prepare_inference
from moekit.infer.sampling import check_sampling, sample
from moekit.infer.slots import SlotKVCache


class QueueFull(RuntimeError):
    """The waiting queue holds max_queue requests already."""


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of its continuation. temperature 0 is greedy; seed makes a sampled request repeatable
    (whatever else runs beside it); logprobs: return each token's log-probability and that many top alternatives
    (None: none)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        check_sampling(self.max_tokens, self.temperature, self.top_k, self.top_p)
        check_int("max_tokens", self.max_tokens, 1)
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, 0, 20)


@dataclass
class TokenEvent:
    """One generated token: its id, with logprobs its log-probability and the top alternatives [(id, logprob)];
    finish_reason on the last one ("stop": a stop token, "length": max_tokens or the context)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[TokenEvent | BaseException], None]  # called on the engine's thread: must return quickly
    id: int = field(default_factory=itertools.count().__next__)
    arrival: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the cache
    admitted: float | None = None  # when it took a slot
    first_token_time: float | None = None
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator | None = None


@dataclass
class StepStats:
    """What one step did, for metrics: decode batch size, prefill tokens, first tokens sampled at the end of a
    prefill, and per MoE layer the expert ids chosen in the decode batch [tokens, k] (empty: no MoE layer)."""

    decode_tokens: int
    prefill_tokens: int
    first_tokens: int
    seconds: float
    routed_ids: dict[int, torch.Tensor]


class Engine:
    def __init__(
        self,
        model,
        max_batch: int = 16,
        context: int = 2048,
        max_queue: int = 256,
        prefill_chunk: int = 512,
        on_step: Callable[[StepStats], None] | None = None,
    ):
        check_int("max_batch", max_batch, 1)
        check_int("max_queue", max_queue, 0)
        if model.config.attention.linear_layers:  # their per-sequence states have no slots in the server's cache
            raise ValueError(f"{model.config.family}: serving models with linear-attention layers is not supported yet")
        check_int("prefill_chunk", prefill_chunk, 1)
        self.model, self.max_batch, self.context = model.eval(), max_batch, context
        self.max_queue, self.prefill_chunk, self.on_step = max_queue, prefill_chunk, on_step
        self.cache = SlotKVCache(max_batch, context)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.running = 0  # decoding sequences, in slots 0..running-1; a prefilling one sits in slot `running`
        prepare_inference(model)

    # ---- requests in and out

    def add(self, request: Request) -> None:
        """Queue a request (QueueFull when max_queue wait already; ValueError when it cannot fit a slot). Safe from
        another thread than step()'s: the queue's operations are atomic."""
        total = len(request.prompt) + request.params.max_tokens
        if not request.prompt:
            raise ValueError("prompt is empty: allowed at least one token")
        if total > self.context:
            raise ValueError(
                f"{len(request.prompt)} prompt tokens + max_tokens={request.params.max_tokens} do not fit: "
                f"allowed context={self.context}"
            )
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting: allowed max_queue={self.max_queue}")
        seed = request.params.seed if request.params.seed is not None else random.getrandbits(63)
        request.generator = torch.Generator().manual_seed(seed)
        self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Stop a request (any thread): it leaves at the next step and frees its slot."""
        request.cancelled = True

    @property
    def prefilling(self) -> Request | None:
        return self.slots[self.running] if self.running < self.max_batch else None

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def num_waiting(self) -> int:
        return sum(not r.cancelled for r in self.waiting)

    def num_running(self) -> int:
        return sum(s is not None for s in self.slots)

    # ---- one iteration

    @torch.inference_mode()
    def step(self) -> StepStats:
        start = time.perf_counter()
        self._leave()
        prefill_tokens = first_tokens = 0
        while prefill_tokens < self.prefill_chunk:  # prompts within the step's token budget
            left = self.prefill_chunk - prefill_tokens
            if self.prefilling is None:
                n, sampled = self._prefill_together(left)  # whole prompts that fit, as one batch
                if n:
                    prefill_tokens, first_tokens = prefill_tokens + n, first_tokens + sampled
                    continue
                self._admit()  # the next prompt is longer than what is left: a chunk of it
                if self.prefilling is None:
                    break
            n, sampled = self._prefill(self.prefilling, left)
            prefill_tokens, first_tokens = prefill_tokens + n, first_tokens + sampled
            if n == 0:
                break
        decode_tokens, routed = self._decode()
        stats = StepStats(decode_tokens, prefill_tokens, first_tokens, time.perf_counter() - start, routed)
        if self.on_step is not None:
            self.on_step(stats)
        return stats

    def _leave(self) -> None:
        """Free the slots of finished and cancelled sequences; move the running ones down into the holes."""
        prefilling = self.prefilling
        for slot, req in enumerate(self.slots):
            if req is not None and (req.finished or req.cancelled):
                self.slots[slot] = None
                self.cache.clear(slot)
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)  # deque operations are atomic: add() may append from another thread
        runners = [s for s in range(self.running) if self.slots[s] is not None]
        n = len(runners)
        holes = [s for s in range(n) if self.slots[s] is None]
        for hole, src in zip(holes, [s for s in runners if s >= n], strict=True):
            self._move(src, hole)
        if prefilling is not None and self.slots[self.running] is prefilling and self.running != n:
            self._move(self.running, n)
        self.running = n

    def _move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)
        self.slots[dst], self.slots[src] = self.slots[src], None

    def _admit(self) -> None:
        if self.prefilling is None and self.running < self.max_batch and self.waiting:
            self._seat(self.waiting.popleft(), self.running)

    def _seat(self, req: Request, slot: int) -> None:
        """A waiting request takes a free slot."""
        self.slots[slot], req.admitted = req, time.monotonic()
        self.cache.clear(slot)

    def _prefill(self, req: Request, budget: int) -> tuple[int, int]:
        """Prefill up to `budget` more of req's prompt (in slot `running`): (tokens prefilled, 1 where that ended
        the prompt and sampled its first token). A request done at its first token frees its slot at once."""
        chunk = req.prompt[req.prefilled : req.prefilled + budget]
        try:
            logits = self.model(torch.tensor([chunk]), cache=self.cache.rows(self.running, 1), logits_to_keep=1)
        except Exception as e:  # a request the model cannot take must not stop the others
            self._fail(req, e)
        else:
            req.prefilled += len(chunk)
            if req.prefilled < len(req.prompt):
                return len(chunk), 0
            self._emit(req, logits[:, -1])
        if req.finished:
            self.slots[self.running] = None
            self.cache.clear(self.running)
        else:  # its first token is sampled: it decodes from now on
            self.running += 1
        return (len(chunk), 1) if req.generated else (0, 0)

    def _prefill_together(self, budget: int) -> tuple[int, int]:
        """The waiting requests whose whole prompts fit `budget` together, prefilled as one batch (right-padded:
        causal attention keeps a row's real tokens from seeing its padding) into the free slots from `running` on;
        each samples its first token and decodes from now on. (tokens prefilled, first tokens sampled)."""
        group, total = [], 0
        while self.waiting and self.running + len(group) < self.max_batch:
            req = self.waiting[0]
            if not req.cancelled and total + len(req.prompt) > budget:
                break
            self.waiting.popleft()
            if not req.cancelled:
                group.append(req)
                total += len(req.prompt)
        if len(group) < 2:
            for req in group:  # one alone: the single-row path
                self.waiting.appendleft(req)
            return 0, 0
        first = self.running
        for i, req in enumerate(group):
            self._seat(req, first + i)
        width = max(len(req.prompt) for req in group)
        ids_BT = torch.tensor([req.prompt + req.prompt[-1:] * (width - len(req.prompt)) for req in group])
        try:
            h_BTD = self.model.hidden_states(ids_BT, cache=self.cache.rows(first, len(group)))
        except Exception as e:  # a batch the model cannot take must not stop the others
            for req in group:
                self._fail(req, e)
            self._leave()
            return 0, 0
        last_B = torch.tensor([len(req.prompt) - 1 for req in group])
        logits_B1V = self.model.head(h_BTD[torch.arange(len(group)), last_B][:, None])
        for i, req in enumerate(group):
            self.cache.lengths[first + i] = req.prefilled = len(req.prompt)  # not the padding
            self._emit(req, logits_B1V[i, -1:])
        self.running += len(group)
        self._leave()  # a request done at its first token leaves
        return total, len(group)

    def _decode(self) -> tuple[int, dict[int, torch.Tensor]]:
        """One token for every running sequence, in one batch (slots 0..running-1)."""
        if self.running == 0:
            return 0, {}
        rows = self.slots[: self.running]
        ids_B1 = torch.tensor([[r.generated[-1]] for r in rows])
        try:
            out = self.model(ids_B1, cache=self.cache.rows(0, self.running), return_routing=True)
        except Exception as e:  # nothing a request sent gets here (prompts are checked): fail the batch, go on
            for req in rows:
                self._fail(req, e)
            return 0, {}
        logits_BV = out.logits[:, -1]
        greedy = [b for b, req in enumerate(rows) if req.params.temperature == 0]
        chosen = dict(zip(greedy, logits_BV[greedy].argmax(-1).tolist(), strict=True)) if greedy else {}
        for b, req in enumerate(rows):
            self._emit(req, logits_BV[b : b + 1], chosen.get(b))
        routed = {i: info.topk_ids_TK for i, info in out.moe.items() if info.topk_ids_TK is not None}
        return self.running, routed

    def _emit(self, req: Request, logits_1V: torch.Tensor, token: int | None = None) -> None:
        """Sample the request's next token from its logits (token: its argmax, taken for the batch at once)."""
        p = req.params
        if token is None:
            token = int(sample(logits_1V, p.temperature, p.top_k, p.top_p, req.generator)[0])
        req.generated.append(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        event = TokenEvent(token)
        if p.logprobs is not None:
            logprobs_V = logits_1V[0].float().log_softmax(-1)
            event.logprob = float(logprobs_V[token])
            if p.logprobs:
                top = logprobs_V.topk(p.logprobs)
                event.top = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        length = len(req.prompt) + len(req.generated)
        if token in p.stop_token_ids:
            event.finish_reason = "stop"
        elif len(req.generated) >= p.max_tokens or length >= self.context:
            event.finish_reason = "length"
        req.finished = event.finish_reason is not None
        req.on_event(event)

    def fail_all(self, error: BaseException) -> None:
        """End every unfinished request, running or waiting, with this error."""
        for req in [*self.slots, *self.waiting]:
            if req is not None and not req.finished:
                self._fail(req, error)

    def _fail(self, req: Request, error: BaseException) -> None:
        req.finished = True
        req.on_event(error)
