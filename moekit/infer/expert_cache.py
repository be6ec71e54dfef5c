"""Running a model whose routed experts do not fit in memory: a pool of expert slots within a memory budget, filled
from the checkpoint's own files as tokens need experts, with an eviction policy and prefetch.

install_expert_cache(model, budget) takes a model loaded with its experts left on disk (load_pretrained(...,
experts_on_disk=True); moekit.from_pretrained(..., expert_memory=...) does both). Everything that is not a routed
expert stays resident; the routed experts of every MoE layer share one pool of slots (ExpertWeights, or
QuantizedExperts for experts the files hold quantized, with one "expert" per slot). Each MoE block gets a
CachedDispatcher: the router's choice is looked up in the pool, missing experts are read (several at once, on
reader threads), the plan's expert ids become slot ids, and the local dispatcher runs the block's own backend on
the pool. The experts' outputs are combined in the plan's own order, so
the output is exactly the resident model's on the same path (the modules; the fused decode steps decline a block
whose experts are elsewhere, as under expert parallelism).

Prefetch: on entering MoE layer l, the next MoE layer's router is applied to layer l's input (its own input is
not known yet; Pre-gated MoE's prediction) and the experts it picks are read in the background while layer l and
the next attention compute. Demand reads go first: a reader takes queued demand reads before queued prefetches,
and a prefetch still queued when its layer arrives without needing it is cancelled. A slot is never evicted while
its layer runs or while a read into it is in flight."""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, fields, replace

import torch

from moekit._validate import check_choice, check_int, parse_bytes
from moekit.checkpoint.expert_files import ExpertReader, ExpertReadError
from moekit.dispatch.local import LocalDispatcher
from moekit.experts.on_disk import ExpertsOnDisk
from moekit.infer.eviction import ONLINE, Eviction
from moekit.routing.plan import RoutingPlan
from moekit.routing.router import TokenChoiceRouter

Key = tuple[int, int]  # (layer, expert)
DEMAND, PREFETCH = 0, 1  # read priorities: lower first
PRECISION_WINDOW = 64  # guesses (one per MoE layer and step) prefetch="auto" judges the predictor by


@dataclass
class CacheStats:
    """What the expert cache did. hits / misses: experts a layer needed that were in the pool or not (a hit on an
    expert still being read counts as a hit that stalled); prefetched: reads started ahead, of which
    prefetch_used were then needed before eviction, prefetch_cancelled dropped before they started; predicted /
    predicted_right / needed_after_prediction: the early router's picks, how many the layer then chose, and how
    many it chose (precision = right / predicted, recall = right / needed)."""

    tokens: int = 0
    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    prefetch_cancelled: int = 0
    predicted: int = 0
    predicted_right: int = 0
    needed_after_prediction: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    stall_seconds: float = 0.0

    def line(self, seconds: float, generated: int) -> str:
        """The live meter: bytes read per token (prompt tokens included), hit rate, prefetch precision, generated
        tokens per second."""
        s = self.summary()
        ahead = f", prefetch precision {s['prefetch_precision']:.0%}" if "prefetch_precision" in s else ""
        return (
            f"experts: {s['bytes_per_token'] / 2**20:,.2f} MiB read per token, hit rate {s['hit_rate']:.0%}{ahead}, "
            f"{generated / max(seconds, 1e-9):.2f} tok/s"
        )

    def summary(self) -> dict:
        needed = self.hits + self.misses
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["hit_rate"] = self.hits / needed if needed else 0.0
        out["bytes_per_token"] = self.bytes_read / self.tokens if self.tokens else 0.0
        out["read_gb_per_s"] = self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0
        if self.predicted:
            out["prefetch_precision"] = self.predicted_right / self.predicted
            out["prefetch_recall"] = self.predicted_right / max(self.needed_after_prediction, 1)
            started = self.prefetched - self.prefetch_cancelled
            out["prefetch_wasted"] = 1 - self.prefetch_used / started if started else 0.0
        return out


def expert_memory_bytes(budget) -> int:
    """A budget as bytes: an int, or text with a unit (8GB, 512MiB) or without (bytes)."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        return check_int("expert_memory", budget, 1)
    return int(parse_bytes("expert_memory", budget)[0])


def _size(n: int, up: bool = False) -> str:
    """Bytes in MiB (KiB below one MiB), rounded up when a minimum is named."""
    unit, name = (2**20, "MiB") if n >= 2**20 else (2**10, "KiB")
    value = -(-n * 10 // unit) / 10 if up else n / unit
    return f"{value:,.1f} {name}"


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of everything the model holds in memory (parameters and buffers; experts on disk hold none)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _Reads:
    """Reader threads taking (priority, order, job) from one queue: queued demand reads before queued prefetches.
    Each job is a Future the caller can cancel while it waits in the queue."""

    def __init__(self, threads: int):
        self.queue: queue.PriorityQueue = queue.PriorityQueue()
        self.order = 0
        self.threads = [
            threading.Thread(target=self._work, daemon=True, name=f"moekit-experts-{i}") for i in range(threads)
        ]
        for t in self.threads:
            t.start()

    def submit(self, priority: int, fn) -> Future:
        future: Future = Future()
        self.order += 1
        self.queue.put((priority, self.order, future, fn))
        return future

    def _work(self) -> None:
        while True:
            _, _, future, fn = self.queue.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the waiting model thread, which raises it
                future.set_exception(e)

    def close(self) -> None:
        """Stop the threads and wait for them (a thread still inside torch at interpreter exit aborts it)."""
        for _ in self.threads:
            self.queue.put((2, 0, None, None))
        for t in self.threads:
            t.join()


class ExpertCache:
    """A pool of expert slots (`pool`: ExpertWeights or QuantizedExperts, one expert per slot) shared by the MoE
    layers `routers` ({layer: its router}), filled by `reader` under `policy` (ONLINE). prefetch: read each next
    layer's predicted experts ahead: True, False, or "auto" (while the last PRECISION_WINDOW predictions were at
    least half right: a wrong guess costs one read, a right one saves one wait, so below one half prefetch costs
    more disk time than it hides; the guesses go on, unread, so that prefetch resumes when they improve). All
    bookkeeping is done on the model's thread; reader threads only fill the slots they are given."""

    def __init__(
        self,
        reader: ExpertReader,
        pool: torch.nn.Module,
        routers: dict[int, torch.nn.Module],
        policy: str = "lru",
        prefetch: bool | str = "auto",
        half_life: float = 64.0,
        threads: int = 4,
    ):
        self.reader, self.pool, self.policy = reader, pool, policy
        self.prefetch = check_choice("prefetch", prefetch, (True, False, "auto"))
        self.recent: deque[tuple[int, int]] = deque(maxlen=PRECISION_WINDOW)  # (predicted, right) per guess
        self.slots = pool.num_experts
        self.layers = sorted(routers)
        self.routers = routers
        self.next_layer = dict(zip(self.layers, self.layers[1:], strict=False))
        self.eviction = Eviction(check_choice("policy", policy, ONLINE), half_life)
        self.slot_of: dict[Key, int] = {}
        self.free = list(range(self.slots))[::-1]
        self.reading: dict[Key, Future] = {}
        self.ahead: set[Key] = set()  # prefetched, not yet needed
        self.in_use: set[Key] = set()  # the running layer's experts
        self.guess: dict[int, set[int]] = {}  # layer -> the experts predicted for it
        self.stats = CacheStats()
        self.clock = 0.0  # tokens seen: the policies' time
        self._reads = _Reads(threads)
        self._stop = weakref.finalize(self, self._reads.close)  # at the latest at interpreter exit
        self._parts = {name: t.detach() for name, t in pool.state_dict(keep_vars=True).items()}

    def slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        """{part: the slot's tensor of it}, what a read fills."""
        return {name: t[slot] for name, t in self._parts.items()}

    def _read(self, key: Key, slot: int) -> tuple[int, float]:
        done = self.reader.read(key, self.slot_tensors(slot))
        fmt = getattr(self.pool, "fmt", None)
        if fmt is not None:  # the format's check of the scales just read (cheap)
            index = torch.tensor([slot])
            for base in self.pool.held_weights():
                try:
                    fmt.check(self.pool.parts(base, index), base)
                except ValueError as e:
                    raise ExpertReadError(f"expert {key[1]} of layer {key[0]}: {e}") from None
        return done

    def acquire(self, layer: int, experts: list[int], tokens: int) -> list[int]:
        """The slots holding `experts` of `layer` (read now where missing), kept until the next acquire."""
        if layer == self.layers[0]:
            self.clock += tokens
            self.stats.tokens += tokens
        self._score_guess(layer, experts)
        self._reap()
        keys = [(layer, e) for e in experts]
        self.in_use = set(keys)
        self._cancel_unneeded(layer, self.in_use)
        for key in keys:
            if key in self.slot_of:
                self.stats.hits += 1
                self.eviction.use(key, self.clock)
                if key in self.ahead:
                    self.ahead.discard(key)
                    self.stats.prefetch_used += 1
                continue
            self.stats.misses += 1
            slot = self._place(key, self.in_use)
            self.reading[key] = self._reads.submit(DEMAND, lambda key=key, slot=slot: self._read(key, slot))
        return [self._wait(key) for key in keys]

    def predict(self, layer: int, x_TD: torch.Tensor) -> None:
        """Prefetch for the MoE layer after `layer`: its router applied to this layer's input."""
        nxt = self.next_layer.get(layer)
        router = self.routers.get(nxt) if nxt is not None else None
        if self.prefetch is False or router is None or type(router) is not TokenChoiceRouter:
            return
        picked = router(x_TD).topk_ids_TK.unique().tolist()
        if len(picked) > self.slots // 2:  # a prompt's worth: the layer will need most experts anyway
            return
        self.guess[nxt] = set(picked)
        if self.prefetch == "auto" and not self.prefetch_pays():
            return
        for e in picked:
            key = (nxt, e)
            if key in self.slot_of:
                continue
            slot = self._place(key, self.in_use | {(nxt, p) for p in picked}, ahead=True)
            if slot is None:
                return
            self.ahead.add(key)
            self.stats.prefetched += 1
            self.reading[key] = self._reads.submit(PREFETCH, lambda key=key, slot=slot: self._read(key, slot))

    def _reap(self) -> None:
        """Finish the bookkeeping of reads that are done (their slots become evictable again)."""
        for key in [k for k, future in self.reading.items() if future.done()]:
            self._wait(key)

    def prefetch_pays(self) -> bool:
        """Whether the recent guesses were at least half right (true until a few were scored)."""
        predicted = sum(p for p, _ in self.recent)
        return len(self.recent) < PRECISION_WINDOW // 4 or 2 * sum(r for _, r in self.recent) >= predicted

    def _score_guess(self, layer: int, experts: list[int]) -> None:
        guess = self.guess.pop(layer, None)
        if guess is not None:
            right = len(guess & set(experts))
            self.recent.append((len(guess), right))
            self.stats.predicted += len(guess)
            self.stats.predicted_right += right
            self.stats.needed_after_prediction += len(experts)

    def _cancel_unneeded(self, layer: int, needed: set[Key]) -> None:
        """Queued prefetches of this layer's experts that it does not need: dropped before they take the disk."""
        for key in [k for k in self.ahead if k[0] == layer and k not in needed and k in self.reading]:
            if self.reading[key].cancel():
                del self.reading[key]
                self.ahead.discard(key)
                self.eviction.remove(key)
                self.free.append(self.slot_of.pop(key))
                self.stats.prefetch_cancelled += 1

    def _place(self, key: Key, pinned: set[Key], ahead: bool = False) -> int | None:
        """A slot for `key` (registered as holding it): a free one, else the policy's victim among the experts not
        pinned and not being read; if none, wait for reads in flight. ahead (a prefetch): never wait (None), and the
        key enters as the first to evict until it is used."""
        wait = not ahead
        while not self.free:
            candidates = [k for k in self.eviction.entries if k not in pinned and k not in self.reading]
            if candidates:
                victim = self.eviction.victim(candidates, self.clock)
                self.eviction.remove(victim)
                self.ahead.discard(victim)
                self.free.append(self.slot_of.pop(victim))
                break
            if not wait or not self.reading:
                if wait:
                    raise RuntimeError(
                        f"expert cache: {self.slots} slots cannot hold the {len(pinned)} experts needed at once"
                    )
                return None
            for k in list(self.reading):
                self._wait(k)
        slot = self.free.pop()
        self.slot_of[key] = slot
        self.eviction.add(key, self.clock, ahead)
        return slot

    def _wait(self, key: Key) -> int:
        future = self.reading.pop(key, None)
        if future is not None:
            start = time.perf_counter()
            try:
                nbytes, seconds = future.result()
            except BaseException:
                self.eviction.remove(key)  # the slot's bytes are not the expert's: never used
                self.ahead.discard(key)
                self.free.append(self.slot_of.pop(key))
                raise
            self.stats.stall_seconds += time.perf_counter() - start
            self.stats.bytes_read += nbytes
            self.stats.read_seconds += seconds
        return self.slot_of[key]

    def drain(self) -> None:
        """Wait for every read in flight (a finished generation, before the stats are read)."""
        for key in list(self.reading):
            try:
                self._wait(key)
            except Exception:  # noqa: BLE001 - a failed prefetch nobody needs: its slot is freed
                pass

    def close(self) -> None:
        self.drain()
        self._stop()
        self.reader.close()


class CachedDispatcher(LocalDispatcher):
    """The local dispatcher over the expert cache's pool: the plan's experts made resident, their ids mapped to
    slots; a layer needing more experts than the pool has slots (a long prompt) runs them in rounds that fit."""

    def __init__(self, cache: ExpertCache, layer: int, num_experts: int):
        self.cache, self.layer, self.num_experts = cache, layer, num_experts

    def run(self, x_TD: torch.Tensor, plan: RoutingPlan, backend, experts) -> torch.Tensor:
        cache = self.cache
        needed = plan.expert_ids_N.unique().tolist()
        if len(needed) <= cache.slots:
            slots = cache.acquire(self.layer, needed, plan.num_tokens)
            cache.predict(self.layer, x_TD)
            return super().run(x_TD, self._on_slots(plan, needed, slots), backend, cache.pool)
        d = self.dispatch(x_TD, plan)
        starts = [0, *torch.tensor(d.counts).cumsum(0).tolist()]
        y_SD = d.x_SD.new_empty(d.x_SD.shape[0], x_TD.shape[1])
        for at in range(0, len(needed), cache.slots):
            group = needed[at : at + cache.slots]
            slots = cache.acquire(self.layer, group, plan.num_tokens if at == 0 else 0)  # the tokens count once
            by_slot = sorted(zip(slots, group, strict=True))
            rows = torch.cat([torch.arange(starts[e], starts[e + 1]) for _, e in by_slot])
            counts = [0] * cache.slots
            for slot, e in by_slot:
                counts[slot] = d.counts[e]
            y_SD[rows] = backend(d.x_SD.index_select(0, rows), counts, cache.pool)
        return self.combine(y_SD, d, plan)

    def _on_slots(self, plan: RoutingPlan, experts: list[int], slots: list[int]) -> RoutingPlan:
        table_E = torch.zeros(self.num_experts, dtype=torch.long, device=plan.expert_ids_N.device)
        table_E[experts] = torch.tensor(slots, dtype=torch.long, device=table_E.device)
        return replace(plan, expert_ids_N=table_E[plan.expert_ids_N], num_experts=self.cache.slots)


def install_expert_cache(
    model,
    budget,
    policy: str = "lru",
    prefetch: bool | str = "auto",
    half_life: float = 64.0,
    direct: bool = True,
    verify: bool = True,
) -> ExpertCache:
    """Give a model whose routed experts are on disk (ExpertsOnDisk) a pool of expert slots: budget is the whole
    model's memory (bytes, or text such as 8GB): what stays resident, and slots for experts in what is left. A
    budget below the resident part plus one layer's top-k experts fails, naming the smallest that works."""
    blocks = {i: b for i, b in model.moe_blocks().items() if isinstance(b.experts, ExpertsOnDisk)}
    if not blocks:
        raise ValueError("expert cache: the model holds its experts in memory (load it with experts_on_disk=True)")
    first = next(iter(blocks.values())).experts
    specs = first.part_specs()
    if any(b.experts.part_specs() != specs for b in blocks.values()):
        raise ValueError("expert cache: the MoE layers' experts differ in shape or format (one pool needs one kind)")
    resident = resident_bytes(model)
    expert = first.expert_bytes()
    total = sum(b.experts.num_experts for b in blocks.values())
    top_k = max(b.router.spec.top_k for b in blocks.values())
    want = expert_memory_bytes(budget)
    slots = min((want - resident) // expert, total) if want > resident else 0
    if slots < top_k:
        least = resident + top_k * expert
        raise ValueError(
            f"expert_memory={budget!r} is too small: the resident part takes {_size(resident)} and one layer's "
            f"{top_k} experts {_size(top_k * expert)}; the smallest budget that works is {_size(least, up=True)}"
        )
    pool = first.pool(slots)
    pieces = {(i, e): p for i, b in blocks.items() for e, p in b.experts.pieces.items()}
    reader = ExpertReader(pieces, direct=direct, verify=verify)
    cache = ExpertCache(reader, pool, {i: b.router for i, b in blocks.items()}, policy, prefetch, half_life)
    for i, block in blocks.items():
        block.dispatcher = CachedDispatcher(cache, i, block.experts.num_experts)
    model.expert_cache = cache
    return cache
