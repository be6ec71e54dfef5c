"""Accelerator catalog: datasheet figures (dense, no sparsity), plus user-supplied specs from a JSON or TOML file.

Bandwidths are the datasheet peaks; the planner multiplies them by a stated efficiency factor. Interconnect is
the per-GPU bidirectional figure of the scale-up link (NVLink, Infinity Fabric, or PCIe where there is none);
network is the per-GPU bidirectional bandwidth between nodes (400 Gb/s InfiniBand/Ethernet per GPU = 100 GB/s).
usd_per_hour is a typical on-demand cloud price per GPU in late 2026: an assumption, override it with your own."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from moekit._validate import check_float, check_int


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gb: float
    bandwidth_gbs: float
    bf16_tflops: float
    fp8_tflops: float | None
    interconnect_gbs: float
    gpus_per_node: int
    network_gbs: float = 100.0
    usd_per_hour: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        for f in ("memory_gb", "bandwidth_gbs", "bf16_tflops", "interconnect_gbs", "network_gbs"):
            check_float(f"hardware.{f}", getattr(self, f), 0.0, lo_open=True)
        check_int("hardware.gpus_per_node", self.gpus_per_node, 1)

    def tflops(self, fp8: bool) -> float:
        """Peak dense matmul rate: fp8 tensor cores for 8-bit weights where the chip has them, else bf16 (4-bit
        formats are dequantised to bf16 for the matmul)."""
        return self.fp8_tflops if fp8 and self.fp8_tflops else self.bf16_tflops


CATALOG: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("a100-40gb", 40, 1555, 312, None, 600, 8, 100, 1.3, "SXM4, NVLink 3"),
        Hardware("a100-80gb", 80, 2039, 312, None, 600, 8, 100, 1.8, "SXM4, NVLink 3"),
        Hardware("h100-sxm", 80, 3350, 989, 1979, 900, 8, 100, 2.5, "NVLink 4"),
        Hardware("h100-pcie", 80, 2000, 756, 1513, 128, 8, 50, 2.2, "PCIe Gen5 x16, no NVLink"),
        Hardware("h200", 141, 4800, 989, 1979, 900, 8, 100, 3.5, "SXM, NVLink 4"),
        Hardware("b200", 180, 8000, 2250, 4500, 1800, 8, 100, 5.0, "HGX B200, NVLink 5"),
        Hardware("gb200", 186, 8000, 2500, 5000, 1800, 72, 100, 6.0, "one Blackwell GPU of an NVL72 rack"),
        Hardware("l40s", 48, 864, 362, 733, 64, 8, 50, 1.0, "PCIe Gen4, no NVLink"),
        Hardware("l4", 24, 300, 121, 242, 64, 8, 25, 0.5, "PCIe Gen4, no NVLink"),
        Hardware("rtx-4090", 24, 1008, 165, 330, 64, 8, 25, 0.4, "consumer card, PCIe Gen4"),
        Hardware("mi300x", 192, 5300, 1307, 2615, 896, 8, 100, 2.5, "Infinity Fabric"),
        Hardware("m2-max", 96, 400, 13.6, None, 10, 1, 10, None, "Apple unified memory; GPU fp16 rate"),
        Hardware("m2-ultra", 192, 800, 27.2, None, 10, 1, 10, None, "Apple unified memory; GPU fp16 rate"),
        Hardware("m3-max", 128, 400, 16.4, None, 10, 1, 10, None, "Apple unified memory; GPU fp16 rate"),
        Hardware("m3-ultra", 512, 819, 32.8, None, 10, 1, 10, None, "Apple unified memory; GPU fp16 rate"),
        Hardware("m4-max", 128, 546, 18.4, None, 10, 1, 10, None, "Apple unified memory; GPU fp16 rate"),
    )
}


def get_hardware(kind: str | Hardware) -> Hardware:
    if isinstance(kind, Hardware):
        return kind
    key = kind.lower().replace("_", "-")
    if key in CATALOG:
        return CATALOG[key]
    if Path(kind).is_file():
        return load_hardware(kind)
    raise ValueError(f"hardware={kind!r} is unknown: allowed one of {', '.join(CATALOG)}, or a JSON/TOML spec file")


def load_hardware(path: str | Path) -> Hardware:
    """A user spec: a JSON or TOML file with the Hardware fields (name, memory_gb, bandwidth_gbs, bf16_tflops,
    interconnect_gbs, gpus_per_node required; fp8_tflops, network_gbs, usd_per_hour, notes optional)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid hardware spec ({e})") from None
    known = {f.name for f in fields(Hardware)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown hardware fields {', '.join(unknown)}: allowed {', '.join(sorted(known))}")
    required = ("name", "memory_gb", "bandwidth_gbs", "bf16_tflops", "interconnect_gbs", "gpus_per_node")
    missing = [f for f in required if f not in data]
    if missing:
        raise ValueError(f"{path}: hardware spec lacks {', '.join(missing)}")
    return Hardware(**{"fp8_tflops": None, **data})
