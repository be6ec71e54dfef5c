"""What a user asks for with `--weights` (moekit quantize, moekit.from_pretrained(quantize=...)): a precision per
class of tensor, and which class a module's weights belong to. Routers, norms and biases belong to none: they stay
in full precision."""

from __future__ import annotations

import torch
from torch import nn

from moekit.experts.weights import ExpertWeights
from moekit.quant.formats import Format, Fp8Blocks, IntPacked, Mxfp4

CLASSES = ("experts", "shared", "attention", "dense", "embedding", "head")
CHOICES: dict[str, Format | None] = {
    "q8": IntPacked(bits=8),
    "q4": IntPacked(bits=4),
    "q4m": IntPacked(bits=4, symmetric=False),
    "q3": IntPacked(bits=3),  # q3 / q2: for what is rarely used (experts=auto); no kernel reads them: dequantized
    "q2": IntPacked(bits=2),
    "mxfp4": Mxfp4(),
    "fp8": Fp8Blocks(),
    "bf16": None,
    "fp32": None,
    "keep": None,
}
FLOATS = {"bf16": torch.bfloat16, "fp32": torch.float32}
AUTO = "auto"  # experts=auto: a format per expert (moekit.quant.mixed)


def parse_weights(spec: str) -> dict[str, str]:
    """{class: choice} for every class from 'experts=q4,rest=q8' (rest: the classes not named; default keep)."""
    named: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in (*CLASSES, "rest"):
            raise ValueError(
                f"--weights item {item!r} is invalid: allowed CLASS=FORMAT, CLASS one of {', '.join(CLASSES)}, rest"
            )
        if value not in CHOICES and not (key == "experts" and value == AUTO):
            raise ValueError(f"--weights {key}={value!r} is invalid: allowed one of {', '.join(CHOICES)}")
        named[key] = value
    rest = named.pop("rest", "keep")
    choices = {c: named.get(c, rest) for c in CLASSES}
    if CHOICES[choices["embedding"]] is not None:
        if "embedding" in named:
            raise ValueError(
                f"--weights embedding={choices['embedding']} is invalid: allowed bf16, fp32, keep "
                "(embeddings are looked up, not multiplied)"
            )
        choices["embedding"] = "keep"
    floats = {FLOATS[v] for v in choices.values() if v in FLOATS}
    if len(floats) > 1:
        raise ValueError("--weights names both bf16 and fp32: allowed one float dtype for the unquantized tensors")
    return choices


def check_one_method(choices: dict[str, str]) -> None:
    """A checkpoint declares one quant_method: mxfp4 and fp8 are each their own and hold one format."""
    special = {v for v in choices.values() if v in ("mxfp4", "fp8")}
    ints = {v for v in choices.values() if v == AUTO or isinstance(CHOICES[v], IntPacked)}
    if len(special) > 1 or (special and ints):
        raise ValueError(
            f"--weights mixes {', '.join(sorted(special | ints))}: mxfp4 and fp8 are each their own "
            "quant_method, which holds one format; mix q8 / q4 / q4m freely"
        )


def module_class(path: str, module: nn.Module) -> str | None:
    """The class (CLASSES) of the weight of module `path` (moekit's name); None: never quantized (routers, norms,
    gates)."""
    if isinstance(module, ExpertWeights):
        return "experts"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if not isinstance(module, nn.Linear) or path.endswith("shared_expert_gate"):
        return None
    if path == "lm_head":
        return "head"
    if ".shared_experts." in f"{path}.":
        return "shared"
    mixers = (".self_attn.", ".linear_attn.", ".mamba.")
    return "attention" if any(m in f"{path}." for m in mixers) else "dense"
