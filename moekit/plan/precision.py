"""Bits per stored weight or cache element, scales included, and mixed expert/rest precisions."""

from __future__ import annotations

from dataclasses import dataclass

# Effective bits per weight: block formats carry their scales (MXFP4: 4-bit values + one 8-bit scale per 32;
# GGUF Q8_0: 8 + 16-bit scale per 32; Q4_0: 4 + 16/32; Q4_K_M: llama.cpp's mixed 4/6-bit recipe, ~4.85 on average;
# int4: 4 + a 16-bit scale per group of 128).
BITS = {
    "fp32": 32.0,
    "bf16": 16.0,
    "fp16": 16.0,
    "fp8": 8.0,
    "int8": 8.0,
    "q8_0": 8.5,
    "q6_k": 6.5625,
    "q4_k_m": 4.85,
    "q4_0": 4.5,
    "int4": 4.125,
    "mxfp4": 4.25,
    # moekit quantize's formats (compressed-tensors pack-quantized, group 32, bf16 scales; q4m: 4-bit zero points)
    "q8": 8.5,
    "q4": 4.5,
    "q4m": 4.625,
    "q3": 3.5,
    "q2": 2.5,
}


def bits(name: str, what: str = "weights") -> float:
    key = name.lower().replace("-", "_")
    if key not in BITS:
        raise ValueError(f"{what}={name!r} is unknown: allowed one of {', '.join(BITS)}")
    return BITS[key]


@dataclass(frozen=True)
class WeightPrecision:
    """Routed experts at one precision, everything else (attention, dense and shared FFNs, head) at another."""

    experts: str = "bf16"
    rest: str = "bf16"
    measured: tuple[float, float] | None = None  # (experts, rest) bits per weight a checkpoint's files hold

    @property
    def expert_bits(self) -> float:
        return self.measured[0] if self.measured else bits(self.experts)

    @property
    def rest_bits(self) -> float:
        return self.measured[1] if self.measured else bits(self.rest)

    def describe(self) -> str:
        if self.measured:
            return f"as stored: experts {self.measured[0]:.2f} bits/weight, rest {self.measured[1]:.2f}"
        if self.experts == self.rest:
            return self.experts
        return f"experts {self.experts}, rest {self.rest}"

    @classmethod
    def parse(cls, text: str | WeightPrecision) -> WeightPrecision:
        """'int4' (everything), or 'experts=mxfp4,rest=bf16' (either part may be left out: bf16)."""
        if isinstance(text, WeightPrecision):
            return text
        if "=" not in text:
            bits(text)
            return cls(text, text)
        parts = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in ("experts", "rest"):
                raise ValueError(f"weights={text!r} is invalid: allowed PREC or experts=PREC,rest=PREC")
            bits(value.strip())
            parts[key.strip()] = value.strip()
        return cls(**parts)
