"""Expert compute backends. Each takes the rows routed to experts, sorted by expert (counts[e] rows for expert e),
and returns each row's expert output. The per-expert loop is the reference every other backend is tested against.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from moekit.experts.layout import apply_activation
from moekit.experts.mixed import MixedExperts
from moekit.experts.quantized import QuantizedExperts
from moekit.experts.segment_mm import TILED_ROWS, segment_mm, torch_grouped_mm
from moekit.experts.weights import ExpertWeights
from moekit.kernels.products import gather_gemv
from moekit.kernels.quantized import quant_gemv

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

HELD = (QuantizedExperts, MixedExperts)  # experts held quantized: dequantized or read by the kernels


class ExpertsBackend:
    """name: registry key; describe: one line for --help and inspect."""

    name = "base"
    describe = ""

    @property
    def label(self) -> str:
        """The name with the options that make this instance differ from the registry's."""
        return self.name

    def unsupported(self, experts: ExpertWeights, x_SD: torch.Tensor) -> str | None:
        """Why this backend cannot run this case, or None."""
        if x_SD.dtype not in _FLOAT_DTYPES:
            return f"dtype {x_SD.dtype} (supported: float32, float16, bfloat16, float64)"
        return None

    def __call__(self, x_SD: torch.Tensor, counts: Sequence[int], experts: ExpertWeights) -> torch.Tensor:
        reason = self.unsupported(experts, x_SD)
        if reason is not None:
            raise ValueError(f"experts backend {self.label!r} does not support {reason}")
        return self.forward(x_SD, counts, experts)

    def forward(self, x_SD: torch.Tensor, counts: Sequence[int], experts: ExpertWeights) -> torch.Tensor:
        raise NotImplementedError

    def one_token(
        self, x_1D: torch.Tensor, ids_K: torch.Tensor, weights_K: torch.Tensor, experts: ExpertWeights, apply_to: str
    ) -> torch.Tensor | None:
        """The combined output [1, D] of one token's k experts (distinct ids, weights applied to the expert 'input'
        or 'output'), for inference; None where this backend has no such path (the caller dispatches as usual)."""
        return None


class LoopBackend(ExpertsBackend):
    """One F.linear per expert and projection: plain, obviously right, the reference."""

    name = "loop"
    describe = "per-expert loop (reference)"

    def forward(self, x_SD, counts, experts):
        layout = experts.layout
        outs, start = [], 0
        matrices = expert_matrices(experts, x_SD.dtype)
        for e, c in enumerate(counts):
            if c == 0:
                continue
            w_up, w_down = matrices(e)
            b_up = experts.gate_up_proj_bias[e] if layout.bias else None
            b_down = experts.down_proj_bias[e] if layout.bias else None
            h = F.linear(x_SD[start : start + c], w_up, b_up)
            outs.append(F.linear(apply_activation(h, layout), w_down, b_down))
            start += c
        if not outs:
            return x_SD.new_zeros(0, experts.hidden_size)
        return torch.cat(outs)


def expert_matrices(experts, dtype: torch.dtype) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """e -> (gate_up [X, D], down [D, F]) of expert e, output-major; quantized experts dequantize that expert."""
    if isinstance(experts, HELD):
        pick = torch.tensor  # the one expert, as an index of the stacked parts
        return lambda e: tuple(experts.dequantized(b, dtype, pick([e]))[0] for b in ("gate_up_proj", "down_proj"))
    # unbind once: indexing the stacked tensor per expert would make autograd allocate a full-size gradient for
    # every expert touched
    ups, downs = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)
    if experts.layout.transposed:
        return lambda e: (ups[e].t(), downs[e].t())
    return lambda e: (ups[e], downs[e])


# The grouped backend's matmul choices, in words.
MATMULS = {
    "auto": "moekit's kernels or torch's grouped_mm, by size",
    "segment": "moekit's kernels and per-thread MKL products",
    "torch_grouped_mm": "torch's grouped matmul kernel",
}


class GroupedBackend(ExpertsBackend):
    """Dropless grouped compute: two segment matmuls around one activation over all rows. matmul picks the kernel
    (MATMULS): 'auto' uses torch's grouped matmul on GPUs (where it is a real kernel) and, on CPU, for small expert
    matrices; otherwise (and always with 'segment') moekit's tiled kernel and per-thread MKL products by segment
    length; 'torch_grouped_mm' always torch's (it refuses unaligned shapes)."""

    name = "grouped"

    def __init__(self, matmul: str = "auto"):
        if matmul not in MATMULS:
            raise ValueError(f"matmul={matmul!r} is invalid: allowed one of {', '.join(map(repr, MATMULS))}")
        self.matmul = matmul
        self.describe = f"dropless grouped segments ({MATMULS[matmul]})"

    @property
    def label(self) -> str:
        return self.name if self.matmul == "auto" else f"{self.name}, matmul={self.matmul}"

    def _mm(self, x_SD: torch.Tensor, w: torch.Tensor, counts: Sequence[int]) -> Callable[..., torch.Tensor]:
        if self.matmul == "torch_grouped_mm":
            return torch_grouped_mm
        if self.matmul != "auto" or not _grouped_mm_runs(x_SD, w):
            return segment_mm
        if x_SD.is_cuda:
            return torch_grouped_mm
        # CPU: torch's grouped matmul runs small expert matrices faster than per-segment products, whose per-task
        # cost dominates there, and loses to them on large ones; short segments (decode) go to moekit's kernel
        small = w[0].numel() <= _CPU_GROUPED_MAX_NUMEL
        return torch_grouped_mm if small and max(counts, default=0) > TILED_ROWS else segment_mm

    def unsupported(self, experts, x_SD):
        reason = super().unsupported(experts, x_SD)
        if reason is None and self.matmul != "auto" and isinstance(experts, HELD):
            return f"quantized experts with matmul={self.matmul!r} (they take matmul 'auto')"
        if reason is None and self.matmul == "torch_grouped_mm":
            if not hasattr(torch, "_grouped_mm"):
                return f"torch {torch.__version__} (it has no grouped matmul)"
            if not (_aligned(x_SD, experts.gate_up_proj) and _aligned(x_SD, experts.down_proj)):
                return "dimensions whose rows are not 16-byte aligned (hidden and expert sizes must be multiples of 8)"
        return reason

    def one_token(self, x_1D, ids_K, weights_K, experts, apply_to):
        """Decode at batch 1: nothing to sort, gather or scatter. The k experts read the one row (expanded, not
        copied) and the kernel streams their weights in one pass per projection."""
        layout = experts.layout
        if self.matmul != "auto" or layout.transposed or torch.is_grad_enabled():
            return None
        weights_K1 = weights_K.to(x_1D.dtype).unsqueeze(1)
        x_KD = x_1D * weights_K1 if apply_to == "input" else x_1D.expand(ids_K.numel(), -1)
        product = _products(experts, ids_K)
        h_KX = product("gate_up_proj", x_KD)
        if layout.bias:
            h_KX = h_KX + experts.gate_up_proj_bias.index_select(0, ids_K)
        a_KF = apply_activation(h_KX, layout).contiguous()
        y_KD = product("down_proj", a_KF)
        if layout.bias:
            y_KD = y_KD + experts.down_proj_bias.index_select(0, ids_K)
        if apply_to == "input":
            return y_KD.sum(0, keepdim=True)
        return weights_K1.t() @ y_KD

    def forward(self, x_SD, counts, experts):
        if isinstance(experts, HELD):  # many rows: each expert used dequantized once, fp32 products
            return BACKENDS["loop"].forward(x_SD, counts, experts)
        layout = experts.layout
        if layout.bias:
            expert_of_row = torch.repeat_interleave(
                torch.arange(len(counts), device=x_SD.device), torch.tensor(list(counts), device=x_SD.device)
            )
        h = self._mm(x_SD, experts.gate_up_proj, counts)(x_SD, experts.gate_up_proj, counts, layout.transposed)
        if layout.bias:
            h = h + experts.gate_up_proj_bias[expert_of_row]
        a = apply_activation(h, layout).contiguous()
        y = self._mm(a, experts.down_proj, counts)(a, experts.down_proj, counts, layout.transposed)
        if layout.bias:
            y = y + experts.down_proj_bias[expert_of_row]
        return y


def _products(experts, ids_K: torch.Tensor) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """(projection, x_KI) -> y_KO: each of the k experts' matrix times its own row (output-major weights); quantized
    experts through the kernel that reads their bytes, or dequantized where it does not take them."""
    if isinstance(experts, QuantizedExperts):
        return lambda base, x_KI: _quantized_product(experts, base, ids_K, x_KI)
    if not isinstance(experts, MixedExperts):
        return lambda base, x_KI: gather_gemv(getattr(experts, base), ids_K, x_KI)
    group_K, slot_K = experts.group_index(ids_K)

    def product(base: str, x_KI: torch.Tensor) -> torch.Tensor:  # each format's experts through its own kernel
        y_KO = x_KI.new_empty(ids_K.numel(), experts.groups[0].piece_shape(base)[1])
        for g, group in enumerate(experts.groups):
            rows = (group_K == g).nonzero().flatten()
            if rows.numel():
                y_KO[rows] = _quantized_product(group, base, slot_K[rows], x_KI[rows])
        return y_KO

    return product


def _quantized_product(experts: QuantizedExperts, base: str, ids_K: torch.Tensor, x_KI: torch.Tensor) -> torch.Tensor:
    y_KO = quant_gemv(experts, base, ids_K, x_KI)
    if y_KO is not None:
        return y_KO
    _say_once(experts)
    return torch.bmm(experts.dequantized(base, x_KI.dtype, ids_K), x_KI.unsqueeze(-1)).squeeze(-1)


_SAID: set[str] = set()


def _say_once(experts: QuantizedExperts) -> None:
    """Where no kernel reads these bytes, say so once: the experts a call uses are dequantized for it (not when the
    user asked for exact products: set_int8_activations(model, False))."""
    if experts.int8_activations and experts.fmt.name not in _SAID:
        _SAID.add(experts.fmt.name)
        warnings.warn(
            f"moekit: no kernel reads {experts.fmt.name} experts of this shape on this path; each call "
            "dequantizes the experts it uses",
            stacklevel=3,
        )


# Largest expert matrix (elements) for which the CPU path takes torch's grouped matmul: measured crossover between
# 256 x 512 (grouped 1.2x faster, forward + backward) and 1024 x 384 (the worker pool 1.1-1.4x faster).
_CPU_GROUPED_MAX_NUMEL = 2**18


def _grouped_mm_runs(x_SD: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped matmul takes these operands: it exists, the dtype, 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm") or x_SD.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return w.dtype == x_SD.dtype and _aligned(x_SD, w)


def _aligned(x_SD: torch.Tensor, w: torch.Tensor) -> bool:
    """Rows of every dimension of one expert's matrix w[e] start on 16 bytes (what grouped matmul needs)."""
    return all((d * x_SD.element_size()) % 16 == 0 for d in w.shape[1:])


BACKENDS: dict[str, ExpertsBackend] = {b.name: b for b in (LoopBackend(), GroupedBackend())}
_GROUPED = {m: GroupedBackend(m) for m in MATMULS}


def get_backend(name: str, matmul: str = "auto") -> ExpertsBackend:
    """The backend `name` ('auto': the default, grouped); matmul: the grouped backend's matmul (MATMULS)."""
    if name == "auto":
        name = "grouped"
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is invalid: allowed one of 'auto', " + ", ".join(map(repr, BACKENDS)))
    if matmul == "auto":
        return BACKENDS[name]
    if name != "grouped":
        raise ValueError(f"matmul={matmul!r} is invalid for backend {name!r}: allowed 'auto' (only grouped has one)")
    if matmul not in _GROUPED:
        raise ValueError(f"matmul={matmul!r} is invalid: allowed one of {', '.join(map(repr, MATMULS))}")
    return _GROUPED[matmul]


def is_default(backend: ExpertsBackend) -> bool:
    """Whether this is the backend a block has unless told otherwise (what moekit's fused steps compute)."""
    return backend is BACKENDS["grouped"]


def register_backend(backend: ExpertsBackend) -> None:
    """Add a backend to the registry (it then can be named in MoEConfig.backend)."""
    BACKENDS[backend.name] = backend
