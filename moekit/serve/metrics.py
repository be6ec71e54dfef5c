"""The server's Prometheus metrics: vLLM's series under a `moekit:` prefix (requests running and waiting, time to
first token, inter-token latency, end-to-end latency, prompt and generation tokens, KV-cache use), and the MoE
series no server exports: tokens per expert per MoE layer, distinct experts read against token-expert assignments
(the expert-batching factor: how many tokens each expert read served), and MaxVio per layer over recent steps."""

from __future__ import annotations

import threading
from collections import deque

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moekit.serve.engine import Engine, StepStats

LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
WINDOW = 256  # decode steps MaxVio and the batching factor's recent value look back over


class ServerMetrics:
    def __init__(self, engine: Engine, model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry

        def gauge(name, doc, fn):
            Gauge(name, doc, registry=r, labelnames=["model_name"]).labels(**labels).set_function(fn)

        gauge("moekit:num_requests_running", "Requests in the running batch.", engine.num_running)
        gauge("moekit:num_requests_waiting", "Requests waiting for a slot.", engine.num_waiting)
        gauge(
            "moekit:kv_cache_usage_perc",
            "Share of the KV cache's token slots in use (1 = full).",
            lambda: engine.cache.used_tokens() / (engine.cache.slots * engine.cache.context),
        )
        counter = {"registry": r, "labelnames": ["model_name"]}
        self.prompt_tokens = Counter("moekit:prompt_tokens", "Prefilled prompt tokens.", **counter).labels(**labels)
        self.generation_tokens = Counter("moekit:generation_tokens", "Generated tokens.", **counter).labels(**labels)
        self.success = Counter(
            "moekit:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.model_name = model_name
        hist = {"registry": r, "labelnames": ["model_name"], "buckets": LATENCY}
        self.ttft = Histogram("moekit:time_to_first_token_seconds", "Time to first token.", **hist).labels(**labels)
        self.itl = Histogram("moekit:inter_token_latency_seconds", "Time between tokens.", **hist).labels(**labels)
        self.e2e = Histogram("moekit:e2e_request_latency_seconds", "Request latency.", **hist).labels(**labels)
        self.queue_time = Histogram("moekit:request_queue_time_seconds", "Time waiting for a slot.", **hist).labels(
            **labels
        )
        self.iteration_tokens = Histogram(
            "moekit:iteration_tokens_total",
            "Tokens per engine step (decode and prefill).",
            registry=r,
            labelnames=["model_name"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
        ).labels(**labels)
        experts = {i: block.cfg.num_experts for i, block in engine.model.moe_blocks().items()}
        self.moe = MoECollector(model_name, experts)
        r.register(self.moe)
        cache = getattr(engine.model, "expert_cache", None)
        if cache is not None:  # a model beyond memory: what its expert cache did
            r.register(ExpertCacheCollector(model_name, cache))

    def on_step(self, stats: StepStats) -> None:
        """Engine thread: what one step did."""
        self.prompt_tokens.inc(stats.prefill_tokens)
        self.generation_tokens.inc(stats.decode_tokens + stats.first_tokens)
        if stats.decode_tokens + stats.prefill_tokens:
            self.iteration_tokens.observe(stats.decode_tokens + stats.prefill_tokens)
        self.moe.add(stats.routed_ids)

    def on_finish(self, reason: str, arrival: float, first: float | None, admitted: float | None, end: float) -> None:
        self.success.labels(model_name=self.model_name, finished_reason=reason).inc()
        self.e2e.observe(end - arrival)
        if first is not None:
            self.ttft.observe(first - arrival)
        if admitted is not None:
            self.queue_time.observe(admitted - arrival)


class ExpertCacheCollector:
    """The expert cache's counters (moekit.infer.expert_cache.CacheStats), read at scrape time."""

    SERIES = (
        ("hits", "Experts a step needed that were in the pool."),
        ("misses", "Experts a step needed that were read from disk then."),
        ("prefetched", "Experts read ahead on the next layer's predicted routing."),
        ("prefetch_used", "Experts read ahead that their layer then used."),
        ("bytes_read", "Bytes of experts read from the checkpoint's files."),
        ("stall_seconds", "Seconds the model waited for expert reads."),
    )

    def __init__(self, model_name: str, cache):
        self.model_name, self.cache = model_name, cache

    def collect(self):
        stats = self.cache.stats
        for field, doc in self.SERIES:
            family = CounterMetricFamily(f"moekit:expert_cache_{field}", doc, labels=["model_name"])
            family.add_metric([self.model_name], getattr(stats, field))
            yield family
        slots = GaugeMetricFamily("moekit:expert_cache_slots", "Expert slots in the pool.", labels=["model_name"])
        slots.add_metric([self.model_name], self.cache.slots)
        yield slots


class MoECollector:
    """Routing telemetry of the decode steps, summed on the engine thread and read at scrape time."""

    def __init__(self, model_name: str, experts_by_layer: dict[int, int]):
        self.model_name, self.experts = model_name, experts_by_layer
        self._lock = threading.Lock()
        self.tokens = {layer: torch.zeros(e, dtype=torch.long) for layer, e in experts_by_layer.items()}
        self.reads = self.assignments = 0  # distinct experts read, token-expert pairs: since start
        self.window: deque = deque(maxlen=WINDOW)  # per step: ({layer: counts_E}, reads, assignments)

    def add(self, routed_ids: dict[int, torch.Tensor]) -> None:
        counts = {
            layer: torch.bincount(ids_TK.flatten(), minlength=self.experts[layer])
            for layer, ids_TK in routed_ids.items()
            if layer in self.experts
        }
        if not counts:
            return
        reads = sum(int((c > 0).sum()) for c in counts.values())
        assignments = sum(int(c.sum()) for c in counts.values())
        with self._lock:
            for layer, counts_E in counts.items():
                self.tokens[layer] += counts_E
            self.reads += reads
            self.assignments += assignments
            self.window.append((counts, reads, assignments))

    def collect(self):
        with self._lock:
            tokens = {layer: t.clone() for layer, t in self.tokens.items()}
            window, reads, assignments = list(self.window), self.reads, self.assignments
        name = [self.model_name]
        per_expert = CounterMetricFamily(
            "moekit:expert_tokens",
            "Tokens routed to each expert of each MoE layer (decode).",
            labels=["model_name", "layer", "expert"],
        )
        for layer, counts_E in sorted(tokens.items()):
            for e, c in enumerate(counts_E.tolist()):
                per_expert.add_metric([*name, str(layer), str(e)], c)
        yield per_expert
        for metric, doc, value in (
            ("moekit:expert_reads", "Distinct experts read, summed over decode steps and MoE layers.", reads),
            ("moekit:expert_assignments", "Token-expert assignments of decode steps.", assignments),
        ):
            family = CounterMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric(name, value)
            yield family
        factor = GaugeMetricFamily(
            "moekit:expert_batching_factor",
            f"Token-expert assignments per distinct expert read over the last {WINDOW} decode steps (1: no sharing).",
            labels=["model_name"],
        )
        recent_reads = sum(w[1] for w in window)
        factor.add_metric(name, sum(w[2] for w in window) / recent_reads if recent_reads else 0.0)
        yield factor
        maxvio = GaugeMetricFamily(
            "moekit:moe_maxvio",
            f"MaxVio (max / mean tokens per expert - 1) per MoE layer over the last {WINDOW} decode steps.",
            labels=["model_name", "layer"],
        )
        for layer in sorted(tokens):
            load_E = sum((w[0][layer] for w in window if layer in w[0]), torch.zeros(self.experts[layer]))
            mean = float(load_E.mean())
            maxvio.add_metric([*name, str(layer)], float(load_E.max()) / mean - 1 if mean else 0.0)
        yield maxvio
