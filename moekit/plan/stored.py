"""The precision a checkpoint holds its weights in, for `moekit plan` when --weights is not given: measured from
the files' bytes where the model is a directory with weights (any mix of formats, experts=auto included), else
read from the config's quantization_config (a published name: gpt-oss's MXFP4 experts, DeepSeek's FP8 blocks,
Kimi's INT4 experts), else None (the planner's bf16)."""

from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path

from moekit.plan.model_stats import ModelStats
from moekit.plan.precision import WeightPrecision

# checkpoint names of routed experts' tensors, whatever the family (mlp.experts., block_sparse_moe.experts., ...)
_ROUTED = re.compile(r"\.experts\.")


def stored_precision(model, stats: ModelStats) -> tuple[WeightPrecision, str] | None:
    """(precision, how it was found) of what `model` (a name, path or config dict) stores, or None."""
    from moekit.checkpoint.files import Shards, checkpoint_dir, weight_map
    from moekit.config.published import load_hf_config

    if isinstance(model, (str, Path)) and Path(model).is_dir():
        path = checkpoint_dir(model)
        try:
            shards = Shards(weight_map(path))
        except ValueError:
            shards = None  # a config without weights
        if shards is not None:
            return _measured(shards, stats), f"measured from the bytes of {path}'s files"
    hf = model if isinstance(model, dict) else load_hf_config(model) if isinstance(model, (str, Path)) else None
    hf = (hf or {}).get("text_config") or hf or {}
    qc = hf.get("quantization_config")
    if not qc:
        return None
    dtype = {"float32": "fp32", "float16": "fp16"}.get(hf.get("torch_dtype") or hf.get("dtype"), "bf16")
    experts, rest = (_config_format(qc, name, dtype) for name in _REPRESENTATIVE)
    how = f"from quantization_config ({qc.get('quant_method')}; rest as attention)"
    if hf.get("expert_dtype") == "fp4":  # DeepSeek-V4 ships its routed experts in 4-bit floats beside fp8 blocks
        experts, how = "mxfp4", how + "; routed experts fp4 (expert_dtype), planned as mxfp4"
    return WeightPrecision(experts, rest), how


_REPRESENTATIVE = ("model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.self_attn.o_proj")


def _measured(shards, stats: ModelStats) -> WeightPrecision:
    routed = rest = 0
    for name in shards.files:
        size = math.prod(shards.shape(name)) * shards.dtype(name).itemsize
        if _ROUTED.search(name) and "shared_experts" not in name:
            routed += size
        else:
            rest += size
    p = stats.params
    expert_bits = 8 * routed / p["routed_experts"] if p["routed_experts"] else 0.0
    return WeightPrecision("stored", "stored", (expert_bits, 8 * rest / (p["total"] - p["routed_experts"])))


def _config_format(qc: dict, module: str, dtype: str) -> str:
    """The precision name of `module` under a quantization_config (dtype where it stays unquantized)."""
    from moekit.checkpoint.quantized import scheme_of
    from moekit.quant.formats import Fp8Blocks, IntPacked, Mxfp4

    kept = [*(qc.get("modules_to_not_convert") or []), *(qc.get("ignore") or [])]
    for pattern in kept:
        if pattern.startswith("re:") and re.match(pattern[3:], module):
            return dtype
        if not pattern.startswith("re:") and any(fnmatch.fnmatch(module, p) for p in (pattern, pattern + ".*")):
            return dtype
    try:
        fmt = scheme_of({"quantization_config": qc}).format_for(module)
    except ValueError:
        return dtype
    if isinstance(fmt, Mxfp4):
        return "mxfp4"
    if isinstance(fmt, Fp8Blocks):
        return "fp8"
    if isinstance(fmt, IntPacked):
        return {8: "q8", 4: "q4" if fmt.symmetric else "q4m", 3: "q3", 2: "q2"}[fmt.bits]
    return dtype
