"""moekit.plan: will a model fit, how fast will it serve, what will a million tokens cost. Every number comes with
the assumption behind it (the `explain` list)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from moekit._validate import check_float, check_int
from moekit.config.model import ModelConfig
from moekit.plan.hardware import CATALOG, Hardware, get_hardware
from moekit.plan.model_stats import ModelStats, model_stats
from moekit.plan.precision import WeightPrecision, bits
from moekit.plan.roofline import Deployment, decode_step, prefill, weight_bytes
from moekit.plan.stored import stored_precision

HOURS_PER_MONTH = 730
GB = 1e9


def resolve_model(model: str | Path | ModelConfig | dict, assumptions: list[str]) -> ModelConfig:
    """A ModelConfig, a HF config dict, a config.json path, a checkpoint directory or a shipped published name."""
    from moekit.families import load_model_config, model_from_hf

    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, dict):
        return model_from_hf(model, "", assumptions)
    return load_model_config(model, assumptions)


def plan(
    model: str | Path | ModelConfig | dict,
    hardware: str | Hardware | None = None,
    gpus: int | None = None,
    weights: str | WeightPrecision | None = None,
    kv: str = "bf16",
    context: int = 4096,
    concurrency: int = 1,
    prompt_tokens: int | None = None,
    gpu_hour_usd: float | None = None,
    utilisation: float = 0.5,
    api_usd_per_mtok: float | None = None,
    bandwidth_efficiency: float = 0.7,
    compute_efficiency: float = 0.5,
    reserve: float = 0.1,
) -> dict:
    """The plan of one deployment as a JSON-ready dict (see the README for its keys). hardware None: try every
    catalog GPU with a price and recommend the cheapest per output token; gpus None: the fewest that fit; weights
    None: what the checkpoint stores (its files' bytes, or its quantization_config), else bf16."""
    check_int("context", context, 1)
    check_int("concurrency", concurrency, 1)
    check_float("utilisation", utilisation, 0.0, 1.0, lo_open=True)
    check_float("bandwidth_efficiency", bandwidth_efficiency, 0.0, 1.0, lo_open=True)
    check_float("compute_efficiency", compute_efficiency, 0.0, 1.0, lo_open=True)
    check_float("reserve", reserve, 0.0, 0.9)
    if gpus is not None:
        check_int("gpus", gpus, 1)
    if gpu_hour_usd is not None:
        check_float("gpu_hour_usd", gpu_hour_usd, 0.0)
    if api_usd_per_mtok is not None:
        check_float("api_usd_per_mtok", api_usd_per_mtok, 0.0, lo_open=True)
    bits(kv, "kv")
    assumptions: list[str] = []
    cfg = resolve_model(model, assumptions)
    stats = model_stats(cfg)
    stored = stored_precision(model, stats) if weights is None and not isinstance(model, ModelConfig) else None
    if stored is not None:
        weights = stored[0]
        assumptions.append(f"weights {weights.describe()}, {stored[1]}")
    weights = WeightPrecision.parse(weights or "bf16")
    args = dict(
        weights=weights,
        kv=kv,
        context=context,
        concurrency=concurrency,
        prompt_tokens=prompt_tokens or context,
        gpu_hour_usd=gpu_hour_usd,
        utilisation=utilisation,
        api_usd_per_mtok=api_usd_per_mtok,
        bandwidth_efficiency=bandwidth_efficiency,
        compute_efficiency=compute_efficiency,
        reserve=reserve,
    )
    if hardware is not None:
        result = _plan_on(stats, get_hardware(hardware), gpus, **args)
    else:
        options = []
        for hw in CATALOG.values():
            if hw.usd_per_hour is None and gpu_hour_usd is None:
                continue
            try:
                options.append(_plan_on(stats, hw, gpus, **args))
            except ValueError:
                continue  # does not fit this kind at the requested count
        if not options:
            raise ValueError("no catalog hardware fits this deployment; pass --hardware and --gpus explicitly")
        options.sort(key=lambda r: r["cost"]["usd_per_mtok_output"])
        result = options[0]
        result["recommendation"] = {
            "why": "cheapest per output token among catalog GPUs at their typical prices",
            "alternatives": [
                {
                    "hardware": r["gpus"]["hardware"],
                    "gpus": r["gpus"]["count"],
                    "tokens_per_s_per_sequence": round(r["decode"]["tokens_per_s_per_sequence"], 1),
                    "usd_per_mtok_output": round(r["cost"]["usd_per_mtok_output"], 3),
                }
                for r in options[1:6]
            ],
        }
    result["model"]["assumptions"] = assumptions
    return result


def _gpu_counts(hw: Hardware) -> list[int]:
    """Counts that tensor/expert parallel layouts use: powers of two within a node, then whole nodes."""
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n < hw.gpus_per_node] + [hw.gpus_per_node]
    return counts + [hw.gpus_per_node * m for m in range(2, 65)]


def _plan_on(stats: ModelStats, hw: Hardware, gpus: int | None, **a) -> dict:
    cfg, p = stats.config, stats.params
    wb = weight_bytes(stats, a["weights"])
    kv_elem = bits(a["kv"], "kv") / 8
    kv_seq = stats.kv_bytes_per_sequence(a["context"], kv_elem)
    kv_total = kv_seq * a["concurrency"]
    needed = wb["total"] + kv_total
    usable = hw.memory_gb * GB * (1 - a["reserve"])
    smallest = next((n for n in _gpu_counts(hw) if n * usable >= needed), None)
    if gpus is None:
        if smallest is None:
            raise ValueError(f"{needed / GB:.0f} GB does not fit on {_gpu_counts(hw)[-1]} x {hw.name}")
        gpus = smallest
    elif gpus * usable < needed:
        hint = f"the smallest that fits is {smallest} x {hw.name}" if smallest else "try a larger GPU kind"
        raise ValueError(
            f"{cfg.name or cfg.family} needs {needed / GB:.1f} GB (weights {wb['total'] / GB:.1f} + KV cache "
            f"{kv_total / GB:.1f}) but {gpus} x {hw.name} hold {gpus * usable / GB:.1f} GB usable: {hint}"
        )
    d = Deployment(
        hw,
        gpus,
        a["weights"],
        a["kv"],
        a["context"],
        a["concurrency"],
        a["bandwidth_efficiency"],
        a["compute_efficiency"],
    )
    decode = decode_step(stats, d)
    pre = prefill(stats, d, a["prompt_tokens"])
    nodes = d.nodes
    if gpus == 1:
        parallelism = "none (one GPU)"
    elif nodes == 1:
        parallelism = f"tensor parallel {gpus} (attention, dense) + expert parallel {gpus} (routed experts)"
    else:
        parallelism = (
            f"tensor parallel {hw.gpus_per_node} within each node + expert parallel {gpus} across {nodes} nodes"
        )
    cost = _cost(d, decode, pre, a)
    moe = cfg.moe
    return {
        "model": {
            "name": cfg.name,
            "family": cfg.family,
            "layers": cfg.num_layers,
            "moe_layers": len(cfg.moe_layers),
            "experts": moe.num_experts if moe else 0,
            "top_k": moe.top_k if moe else 0,
            "shared_experts": moe.num_shared_experts if moe else 0,
            "attention": cfg.attention.describe(),
        },
        "params": {
            **p,
            "convention": "total/active include the input embedding and output head; active_without_embeddings "
            "excludes both; active_without_input_embedding excludes the input embedding; MTP modules apart",
        },
        "weights": {
            "precision": a["weights"].describe(),
            "bits_per_weight": {"experts": a["weights"].expert_bits, "rest": a["weights"].rest_bits},
            "bytes": {k: int(v) for k, v in wb.items()},
        },
        "kv_cache": {
            "precision": a["kv"],
            "bytes_per_token": int(stats.kv_bytes_per_token(kv_elem)),
            "bytes_per_sequence": int(kv_seq),
            "bytes_total": int(kv_total),
            "context": a["context"],
            "concurrency": a["concurrency"],
        },
        "memory": {
            "needed_bytes": int(needed),
            "reserve_fraction": a["reserve"],
            "usable_per_gpu_bytes": int(usable),
            "used_fraction": needed / (gpus * usable),
        },
        "gpus": {
            "hardware": hw.name,
            "count": gpus,
            "nodes": nodes,
            "smallest_that_fits": smallest,
            "parallelism": parallelism,
            "hardware_spec": asdict(hw),
        },
        "efficiency": {"bandwidth": a["bandwidth_efficiency"], "compute": a["compute_efficiency"]},
        "decode": decode,
        "prefill": pre,
        "cost": cost,
        "explain": _explain(stats, d, decode, pre, cost, a),
    }


def _cost(d: Deployment, decode: dict, pre: dict, a: dict) -> dict:
    price = a["gpu_hour_usd"] if a["gpu_hour_usd"] is not None else d.hardware.usd_per_hour
    if price is None:
        return {"gpu_hour_usd": None, "profile": _profile(d, None), "note": "no price: pass --gpu-hour-usd"}
    per_second = d.gpus * price / 3600
    util = a["utilisation"]
    out = per_second / (decode["aggregate_tokens_per_s"] * util) * 1e6
    inp = per_second / (pre["tokens_per_s"] * util) * 1e6
    monthly = d.gpus * price * HOURS_PER_MONTH
    capacity = decode["aggregate_tokens_per_s"] * 3600 * HOURS_PER_MONTH * util / 1e6
    result = {
        "gpu_hour_usd": price,
        "utilisation": util,
        "usd_per_mtok_output": out,
        "usd_per_mtok_input": inp,
        "monthly_usd": monthly,
        "capacity_mtok_per_month": capacity,
    }
    api = a["api_usd_per_mtok"]
    if api is not None:
        result["api_usd_per_mtok"] = api
        result["break_even_mtok_per_month"] = monthly / api
        result["cheaper_than_api_at_capacity"] = monthly / api <= capacity
    result["profile"] = _profile(d, result)
    return result


def _profile(d: Deployment, cost: dict | None) -> str:
    if cost and cost.get("cheaper_than_api_at_capacity") is False:
        return "use an API"
    if d.gpus == 1:
        return "single GPU"
    return "one node" if d.nodes == 1 else "multi-node"


def _explain(stats: ModelStats, d: Deployment, decode: dict, pre: dict, cost: dict, a: dict) -> list[str]:
    p, hw = stats.params, d.hardware
    lines = [
        f"parameters from the model moekit builds on the meta device: {p['total'] / 1e9:.2f}B total, "
        f"{p['active'] / 1e9:.2f}B active per token ({p['active_without_embeddings'] / 1e9:.2f}B without "
        f"embedding and head)",
        f"weights at {a['weights'].describe()}: {weight_bytes(stats, a['weights'])['total'] / GB:.1f} GB; KV cache "
        f"at {a['kv']}: {stats.kv_bytes_per_token(bits(a['kv'], 'kv') / 8):,.0f} bytes per token, "
        f"{a['context']} tokens x {a['concurrency']} sequences",
        f"{d.gpus} x {hw.name} ({hw.memory_gb:g} GB, {hw.bandwidth_gbs:g} GB/s, {hw.tflops(d.fp8_compute):g} "
        f"TFLOPs dense), {a['reserve']:.0%} of memory reserved for activations and runtime",
        f"decode step of {decode['batch']} sequences reads {decode['bytes_per_step'] / GB:.2f} GB "
        f"({decode['distinct_experts_per_layer']} distinct experts per MoE layer = E(1-(1-k/E)^B)); "
        f"{decode['bound']}-bound at {a['bandwidth_efficiency']:.0%} of peak bandwidth / "
        f"{a['compute_efficiency']:.0%} of peak compute",
    ]
    if decode["communication"]["bytes"]:
        lines.append(
            f"collectives per step: {decode['communication']['bytes'] / 1e6:.2f} MB over the "
            f"{decode['communication']['link']}, plus a fixed latency per collective, not overlapped"
        )
    lines.append(f"prefill of {pre['prompt_tokens']} tokens: {pre['flops'] / 1e12:.1f} TFLOP, {pre['bound']}-bound")
    if cost.get("gpu_hour_usd") is not None:
        lines.append(
            f"cost at ${cost['gpu_hour_usd']:g}/GPU-hour and {cost['utilisation']:.0%} utilisation; "
            f"{HOURS_PER_MONTH} hours per month"
        )
    return lines
