"""Roofline speed of one deployment: decode steps bound by the bytes they read (or their FLOPs), prefill by FLOPs,
plus the collective traffic of tensor and expert parallelism. Pure functions of ModelStats and the deployment."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.plan.hardware import Hardware
from moekit.plan.model_stats import ModelStats
from moekit.plan.precision import WeightPrecision, bits

ACTIVATION_BYTES = 2  # bf16 activations on the wire
LINK_LATENCY_S = {"intra": 5e-6, "inter": 15e-6}  # per collective


@dataclass(frozen=True)
class Deployment:
    hardware: Hardware
    gpus: int
    weights: WeightPrecision
    kv: str
    context: int
    concurrency: int
    bandwidth_efficiency: float
    compute_efficiency: float

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.hardware.gpus_per_node)

    @property
    def fp8_compute(self) -> bool:
        return self.weights.rest in ("fp8", "int8", "q8_0") and self.weights.experts in ("fp8", "int8", "q8_0")


def distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Expected experts a layer touches when `batch` tokens each pick top_k of num_experts uniformly."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def weight_bytes(stats: ModelStats, weights: WeightPrecision) -> dict[str, float]:
    p = stats.params
    experts = p["routed_experts"] * weights.expert_bits / 8
    rest = (p["total"] - p["routed_experts"]) * weights.rest_bits / 8
    return {"experts": experts, "rest": rest, "total": experts + rest}


def decode_bytes(
    stats: ModelStats, batch: int, context: int, weights: WeightPrecision, kv_bytes: float
) -> dict[str, float]:
    """Bytes one decode step of `batch` sequences with `context` cached tokens reads: the weights every step needs
    (one embedding row per token), the distinct experts the batch touches, the KV cache."""
    touched = [distinct_experts(m.num_experts, m.top_k, batch) for m in stats.moe_layers]
    expert_params = sum(t * m.params_per_expert for t, m in zip(touched, stats.moe_layers, strict=True))
    return {
        "experts": expert_params * weights.expert_bits / 8,
        "other_weights": (stats.always_read_params + batch * stats.config.hidden_size) * weights.rest_bits / 8,
        "kv_cache": batch * stats.kv_bytes_per_sequence(context, kv_bytes),
        "distinct_experts_per_layer": sum(touched) / len(touched) if touched else 0.0,
    }


def decode_step(stats: ModelStats, d: Deployment) -> dict:
    """One decode step of d.concurrency sequences, each with d.context tokens cached."""
    b = d.concurrency
    parts = decode_bytes(stats, b, d.context, d.weights, bits(d.kv, "kv") / 8)
    read = parts["experts"] + parts["other_weights"] + parts["kv_cache"]
    keys = sum(layer.kept(d.context) for layer in stats.kv_layers)
    flops = b * (2 * (stats.params["active"] - stats.params["embedding"]))
    flops += b * stats.attention_flops_per_key * keys
    hw = d.hardware
    peak_bw, peak_flops = d.gpus * hw.bandwidth_gbs * 1e9, d.gpus * hw.tflops(d.fp8_compute) * 1e12
    comm = collectives(stats, d, tokens=b)
    ceiling = max(read / peak_bw, flops / peak_flops) + comm["seconds"]
    memory_s = read / (peak_bw * d.bandwidth_efficiency)
    compute_s = flops / (peak_flops * d.compute_efficiency)
    step = max(memory_s, compute_s) + comm["seconds"]
    return {
        "batch": b,
        "distinct_experts_per_layer": round(parts["distinct_experts_per_layer"], 2),
        "bytes_per_step": int(read),
        "bytes": {k: int(parts[k]) for k in ("experts", "other_weights", "kv_cache")},
        "flops_per_step": int(flops),
        "memory_time_s": memory_s,
        "compute_time_s": compute_s,
        "communication": comm,
        "step_time_s": step,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "ceiling_tokens_per_s_per_sequence": 1 / ceiling,
        "tokens_per_s_per_sequence": 1 / step,
        "aggregate_tokens_per_s": b / step,
    }


def prefill(stats: ModelStats, d: Deployment, prompt_tokens: int) -> dict:
    """Time to first token of one prompt: FLOPs of every token through the active weights plus causal attention,
    or reading all weights once, whichever is longer."""
    p = prompt_tokens
    flops = 2 * (stats.params["active"] - stats.params["embedding"]) * p
    for layer in stats.kv_layers:  # query i sees min(i + 1, window) keys
        w = layer.kept(p)
        flops += stats.attention_flops_per_key * (w * (w + 1) / 2 + (p - w) * w)
    hw = d.hardware
    compute_s = flops / (d.gpus * hw.tflops(d.fp8_compute) * 1e12 * d.compute_efficiency)
    memory_s = weight_bytes(stats, d.weights)["total"] / (d.gpus * hw.bandwidth_gbs * 1e9 * d.bandwidth_efficiency)
    comm = collectives(stats, d, tokens=p)
    ttft = max(compute_s, memory_s) + comm["seconds"]
    return {
        "prompt_tokens": p,
        "flops": int(flops),
        "compute_time_s": compute_s,
        "communication_s": comm["seconds"],
        "time_to_first_token_s": ttft,
        "tokens_per_s": p / ttft,
        "bound": "compute" if compute_s >= memory_s else "memory",
    }


def expert_parallel_bytes(
    stats: ModelStats, tokens: int, ranks: int, activation_bytes: int = ACTIVATION_BYTES
) -> float:
    """Bytes one rank sends by all-to-all in one forward pass of `tokens` tokens spread evenly over `ranks` ranks,
    the experts too: each MoE layer sends every token's k rows to their experts' ranks and takes them back, the
    share routed to the rank's own experts ((1 / ranks) of them under even routing) staying put."""
    rows = tokens / ranks * (ranks - 1) / ranks
    return sum(2 * m.top_k * rows * stats.config.hidden_size * activation_bytes for m in stats.moe_layers)


def collectives(stats: ModelStats, d: Deployment, tokens: int) -> dict:
    """Per forward pass over `tokens` tokens: tensor parallelism all-reduces the attention output of every layer
    within a node; expert parallelism sends each token to its k experts and back (all-to-all) across all GPUs.
    Bytes that stay on a GPU are free; time = bytes over the slowest link in use + a latency per collective."""
    n = d.gpus
    if n == 1:
        return {"bytes": 0, "seconds": 0.0, "link": "none"}
    cfg, hw = stats.config, d.hardware
    act = tokens * cfg.hidden_size * ACTIVATION_BYTES
    tp = min(n, hw.gpus_per_node)
    allreduce = 2 * (tp - 1) / tp * act * cfg.num_layers if tp > 1 else 0
    top_k = [m.top_k for m in stats.moe_layers]
    alltoall = n * expert_parallel_bytes(stats, tokens, n)
    inter = d.nodes > 1
    link_gbs = hw.network_gbs if inter else hw.interconnect_gbs
    count = (cfg.num_layers if tp > 1 else 0) + 2 * len(top_k)
    seconds = (allreduce + alltoall) / (link_gbs * 1e9 / 2) + count * LINK_LATENCY_S["inter" if inter else "intra"]
    return {
        "bytes": int(allreduce + alltoall),
        "seconds": seconds,
        "link": f"{'network' if inter else 'interconnect'} {link_gbs:g} GB/s",
    }
