"""Deployment planning: parameters, memory, KV cache, GPUs, roofline speed and cost, from a model's config."""

from moekit.plan.hardware import CATALOG, Hardware, get_hardware, load_hardware
from moekit.plan.planner import plan
from moekit.plan.precision import BITS, WeightPrecision

__all__ = ["BITS", "CATALOG", "Hardware", "WeightPrecision", "get_hardware", "load_hardware", "plan"]
