"""Expert-aware mixed precision (`moekit quantize --weights experts=auto`): a format for each routed expert, from
how much its quantization would change the model's loss on calibration text.

For every expert e and candidate format c the calibration estimates the loss the rounding adds, to second order
with the empirical Fisher: err[e, c] = sum over the tokens t routed to e of (g_t . w_t (f_e^c(x_t) - f_e(x_t)))^2,
where f_e^c is the expert with its weights quantized to c, w_t the token's gate weight and g_t the gradient of the
token's next-token loss with respect to the MoE block's output (one backward pass over the calibration text). It is
a sum over the tokens that reach the expert, so usage and sensitivity enter together: an expert few tokens use
costs little in any format, a busy one or one whose output the loss is sensitive to much; the gradient puts experts
of different layers on one scale (an output error in a late layer is not worth the same as in an early one). The
choice minimises the total within a byte budget (a multiple-choice knapsack, solved greedily along each expert's
lower convex hull of (bytes, error), the usual exchange argument; optimal up to the last step). Experts are scored
one at a time: interactions between experts' errors are ignored."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moekit.experts.backends import expert_matrices
from moekit.experts.layout import apply_activation
from moekit.experts.weights import ExpertWeights
from moekit.infer.tokenizers import load_tokenizer
from moekit.layers.moe import MoEBlock
from moekit.quant.choices import CHOICES
from moekit.quant.formats import IntPacked
from moekit.train.data import load_corpus

CANDIDATES = ("q2", "q3", "q4", "q4m", "q8")  # one quant_method (compressed-tensors) holds them all
SAMPLES_PER_EXPERT = 512  # calibration rows kept per expert (the error is scaled up to all its tokens)
CALIBRATION_TOKENS = 16384
SEQ_LEN = 256
CHOICE_FILE = "expert_formats.json"  # the choice, saved beside the weights


@dataclass
class ExpertStats:
    """What calibration measured of one layer's experts: tokens routed to each, and err_EC / bytes_EC per
    candidate."""

    module: str
    params_per_expert: int
    tokens_E: list[int]
    err_EC: torch.Tensor
    bytes_EC: torch.Tensor
    choice_E: list[int] = field(default_factory=list)


def expert_bytes(experts: ExpertWeights, choice: str) -> int:
    """Bytes one expert of the layer holds in format `choice` (its gate, up and down matrices, as files hold them)."""
    f, d = experts.expert_hidden, experts.hidden_size
    shapes = [(f, d), (d, f)] + ([(f, d)] if experts.layout.gated else [])
    return sum(CHOICES[choice].stored_bytes(s) for s in shapes)


def calibration_batches(
    directory: Path, vocab_size: int, path: str | None = None, tokens: int = CALIBRATION_TOKENS
) -> list[torch.Tensor]:
    """Windows of SEQ_LEN tokens ([8, SEQ_LEN] batches) of the text at path (a file or directory; default the
    Python standard library's training files, text every machine has), through the model's own tokenizer."""
    text, _, what = load_corpus(path or "", 8 * tokens, 1)
    ids = load_tokenizer(directory, vocab_size).encode(text)[:tokens]
    if len(ids) < SEQ_LEN:
        raise ValueError(f"calibration text {what}: {len(ids)} tokens: allowed at least {SEQ_LEN}")
    windows = torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN], dtype=torch.long).view(-1, SEQ_LEN)
    return list(windows.split(8))


def calibrate(model: nn.Module, batches: list[torch.Tensor], candidates=CANDIDATES) -> list[ExpertStats]:
    """Run the float model over the batches ([B, T] token ids) and back from their next-token loss, collect each
    MoE layer's inputs and the loss gradient at its output, and score every expert in every candidate format."""
    for c in candidates:
        if not isinstance(CHOICES.get(c), IntPacked):
            raise ValueError(f"experts=auto candidate {c!r} is invalid: allowed q8, q4, q4m, q3, q2 (one quant_method)")
    blocks = {
        n: m for n, m in model.named_modules() if isinstance(m, MoEBlock) and isinstance(m.experts, ExpertWeights)
    }
    if not blocks:
        raise ValueError("experts=auto: the model has no routed experts held in float")
    inputs: dict[str, list] = {n: [] for n in blocks}
    outputs: dict[str, torch.Tensor] = {}
    grads: dict[str, list] = {n: [] for n in blocks}

    def keep_output(n: str, y_BTD: torch.Tensor) -> None:
        if y_BTD.requires_grad:
            y_BTD.retain_grad()  # a later layer's output: its gradient is kept through the graph
        else:
            y_BTD.requires_grad_(True)  # the first: the graph starts here (no parameter takes a gradient)
        outputs[n] = y_BTD

    hooks = [
        h
        for n, block in blocks.items()
        for h in (
            block.register_forward_pre_hook(lambda _, a, n=n: inputs[n].append(a[0].detach().flatten(0, -2))),
            block.register_forward_hook(lambda _, a, out, n=n: keep_output(n, out[0])),
        )
    ]
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        for ids_BT in batches:
            logits = model(ids_BT).float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), ids_BT[:, 1:].flatten(), reduction="sum"
            )
            loss.backward()
            for n, y_BTD in outputs.items():
                grads[n].append(y_BTD.grad.flatten(0, -2))
            outputs.clear()
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    return [
        _layer_stats(f"{n}.experts", blocks[n], torch.cat(inputs[n]), torch.cat(grads[n]), candidates) for n in blocks
    ]


@torch.no_grad()
def _layer_stats(module: str, block: MoEBlock, x_TD: torch.Tensor, g_TD: torch.Tensor, candidates) -> ExpertStats:
    experts = block.experts
    plan = block.router(x_TD)
    gen = torch.Generator().manual_seed(0)
    matrices = expert_matrices(experts, torch.float32)
    tokens_E, err = [], torch.zeros(experts.num_experts, len(candidates), dtype=torch.float64)
    for e in range(experts.num_experts):
        mine = (plan.expert_ids_N == e).nonzero().flatten()
        tokens_E.append(int(mine.numel()))
        if not mine.numel():
            continue
        sample = mine[torch.randperm(mine.numel(), generator=gen)[:SAMPLES_PER_EXPERT]]
        tokens_S = plan.token_ids_N[sample]
        x_SD, g_SD, w_S = x_TD[tokens_S].float(), g_TD[tokens_S].float(), plan.weights_N[sample].float()
        up, down = matrices(e)
        b_up = experts.gate_up_proj_bias[e] if experts.layout.bias else None
        b_down = experts.down_proj_bias[e] if experts.layout.bias else None

        def expert(w_up, w_down):
            h = torch.nn.functional.linear(x_SD, w_up, b_up)
            return torch.nn.functional.linear(apply_activation(h, experts.layout), w_down, b_down)

        y_SD = expert(up, down)
        for c, choice in enumerate(candidates):
            fmt = CHOICES[choice]
            q_up = fmt.dequantize(fmt.quantize(up.float()), tuple(up.shape))
            q_down = fmt.dequantize(fmt.quantize(down.float()), tuple(down.shape))
            change_S = w_S * ((expert(q_up, q_down) - y_SD) * g_SD).sum(-1)  # first-order loss change per token
            err[e, c] = float(change_S.pow(2).sum()) * mine.numel() / sample.numel()
    bytes_EC = torch.tensor([[expert_bytes(experts, c) for c in candidates]] * experts.num_experts, dtype=torch.float64)
    params = (3 if experts.layout.gated else 2) * experts.expert_hidden * experts.hidden_size
    return ExpertStats(module, params, tokens_E, err, bytes_EC)


def choose(stats: list[ExpertStats], budget_bytes: float, candidates=CANDIDATES) -> dict[str, list[str]]:
    """{experts module: [format per expert]} of least total error within budget_bytes of routed experts: every
    expert starts at its cheapest hull point; then the upgrade that removes the most error per byte is taken while
    it fits. Raises where even the cheapest choice exceeds the budget."""
    hulls = [[_hull(s.bytes_EC[e], s.err_EC[e]) for e in range(len(s.tokens_E))] for s in stats]
    at = [[0] * len(h) for h in hulls]
    spent = sum(float(s.bytes_EC[e, h[0]]) for s, layer in zip(stats, hulls, strict=True) for e, h in enumerate(layer))
    if spent > budget_bytes:
        cheapest = min(candidates, key=lambda c: stats[0].bytes_EC[0, candidates.index(c)])
        raise ValueError(
            f"experts=auto: the budget ({budget_bytes / 1e6:.2f} MB of routed experts) is below every expert in "
            f"{cheapest} ({spent / 1e6:.2f} MB): allowed a larger target"
        )
    while True:
        best = None
        for li, (s, layer) in enumerate(zip(stats, hulls, strict=True)):
            for e, hull in enumerate(layer):
                i = at[li][e]
                if i + 1 >= len(hull):
                    continue
                now, nxt = hull[i], hull[i + 1]
                cost = float(s.bytes_EC[e, nxt] - s.bytes_EC[e, now])
                gain = float(s.err_EC[e, now] - s.err_EC[e, nxt])
                if spent + cost <= budget_bytes and (best is None or gain / cost > best[0]):
                    best = (gain / cost, li, e, cost)
        if best is None:
            break
        _, li, e, cost = best
        at[li][e] += 1
        spent += cost
    out = {}
    for s, layer, chosen in zip(stats, hulls, at, strict=True):
        s.choice_E = [hull[i] for hull, i in zip(layer, chosen, strict=True)]
        out[s.module] = [candidates[c] for c in s.choice_E]
    return out


def summary(stats: list[ExpertStats], plan: dict[str, list[str]], candidates, budget: float, weights: float) -> dict:
    """The choice as saved and printed: per layer each expert's format, tokens routed and error in each candidate;
    totals of bytes and predicted error against uniform formats."""
    total = {c: 0.0 for c in candidates}
    spent = chosen = 0.0
    layers = {}
    for s in stats:
        for c, name in enumerate(candidates):
            total[name] += float(s.err_EC[:, c].sum())
        spent += sum(float(s.bytes_EC[e, c]) for e, c in enumerate(s.choice_E))
        chosen += sum(float(s.err_EC[e, c]) for e, c in enumerate(s.choice_E))
        layers[s.module] = {
            "formats": plan[s.module],
            "tokens": s.tokens_E,
            "error": {name: [float(x) for x in s.err_EC[:, c]] for c, name in enumerate(candidates)},
        }
    counts = {c: sum(f.count(c) for f in plan.values()) for c in candidates}
    return {
        "budget_bytes": budget,
        "bytes": spent,
        "bits_per_weight": 8 * spent / weights,
        "experts_per_format": counts,
        "error": chosen,
        "error_uniform": total,
        "layers": layers,
    }


def _hull(bytes_C: torch.Tensor, err_C: torch.Tensor) -> list[int]:
    """Candidates on the lower convex hull of (bytes, error), cheapest first: the ones worth upgrading through."""
    order = sorted(range(len(bytes_C)), key=lambda c: (float(bytes_C[c]), float(err_C[c])))
    hull: list[int] = []
    for c in order:
        if hull and float(err_C[c]) >= float(err_C[hull[-1]]):
            continue  # costs more, removes no error
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]  # b is under the chord a -> c only if the slope worsens
            slope_ab = (err_C[a] - err_C[b]) / (bytes_C[b] - bytes_C[a])
            slope_bc = (err_C[b] - err_C[c]) / (bytes_C[c] - bytes_C[b])
            if slope_bc >= slope_ab:
                hull.pop()
            else:
                break
        hull.append(c)
    return hull
