"""Self-speculative decoding with the model's own multi-token-prediction (MTP) modules (DeepSeek-V3 report, §5.4.3):
each round the MTP depths draft the next tokens, one pass of the main model over them checks all drafts at once,
and standard speculative sampling (Leviathan et al. 2023) keeps the output distribution exactly the main model's:
a draft d drawn from the MTP's q is kept with probability min(1, p(d)/q(d)); at the first rejection the token is
drawn from max(p - q, 0) instead, and when all drafts pass, one more token comes from the main model for free.
At temperature 0, p and q are one-hot, so the output is the main model's greedy continuation.

Bookkeeping, per round with x_0..x_N known and the main cache holding positions 0..N-1:
  depth j at position i reads the previous depth's hidden state at i and token x_{i+1+j}; each depth keeps its own
  KV cache and the hidden states it produced, and runs over the positions it has not cached yet (up to N-1), the
  last of which needs earlier depths' drafts. After the main model accepts a of the drafts, depth j's entries stay
  valid up to position N + a - 1 - j (those that read only accepted tokens); the rest are truncated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moekit.infer.cache import KVCache
from moekit.infer.fast import prepare_inference
from moekit.infer.sampling import check_sampling, distribution


@dataclass
class SpeculationStats:
    """Drafts checked and accepted by depth (depth j is checked only when depths < j all passed, so
    accepted_by_depth[0] / checked_by_depth[0] is the acceptance rate DeepSeek-V3 reports for its one MTP depth);
    rounds = passes of the main model after the prompt's."""

    checked_by_depth: list[int] = field(default_factory=list)
    accepted_by_depth: list[int] = field(default_factory=list)
    rounds: int = 0
    tokens: int = 0  # generated tokens
    history: list[tuple[int, list[int], int]] = field(default_factory=list)  # (tokens known, drafts, accepted)

    def reset(self, depths: int) -> None:
        self.checked_by_depth, self.accepted_by_depth = [0] * depths, [0] * depths
        self.rounds, self.tokens, self.history = 0, 0, []

    @property
    def acceptance_rate(self) -> float:
        checked = sum(self.checked_by_depth)
        return sum(self.accepted_by_depth) / checked if checked else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Generated tokens per main-model pass (1.0 without speculation; the first token comes from the prompt)."""
        return (self.tokens - 1) / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_round": self.tokens_per_round,
            "rounds": self.rounds,
            "checked_by_depth": self.checked_by_depth,
            "accepted_by_depth": self.accepted_by_depth,
        }


def accept_or_resample(p_V: torch.Tensor, q_V: torch.Tensor, draft: int, generator) -> tuple[bool, int]:
    """One speculative-sampling test: (accepted, token). The token is distributed as p whatever q is."""
    u = torch.rand((), generator=generator)
    if float(u) * float(q_V[draft]) < float(p_V[draft]):  # strict: a draft p gives zero mass is never kept
        return True, draft
    residual_V = (p_V - q_V).clamp_min(0)
    if float(residual_V.sum()) <= 0:  # p == q up to rounding: the rejection had probability ~0
        residual_V = p_V
    return False, int(torch.multinomial(residual_V, 1, generator=generator))


def _draw(probs_V: torch.Tensor, generator) -> int:
    return int(torch.multinomial(probs_V, 1, generator=generator))


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    seed: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    stats: SpeculationStats | None = None,
    draft_depths: int | None = None,
) -> torch.Tensor:
    """input_ids [1, T] -> [1, T + n], n <= max_new_tokens, drafting with the first draft_depths MTP modules (all by
    default). Same sampling arguments as moekit.infer.generate.generate; stats (if given) is filled in."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    depths = len(model.mtp) if draft_depths is None else draft_depths
    if not model.mtp:
        raise ValueError("speculative decoding needs multi-token-prediction layers: this model has mtp_layers=0")
    if not 1 <= depths <= len(model.mtp):
        raise ValueError(f"draft_depths={depths} is invalid: allowed [1, {len(model.mtp)}]")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} is invalid: allowed [1, tokens >= 1]")
    stats = stats if stats is not None else SpeculationStats()
    stats.reset(depths)
    if max_new_tokens == 0:
        return input_ids
    model.eval()
    prepare_inference(model)
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
    probs = lambda logits_1V: distribution(logits_1V, temperature, top_k, top_p)[0]  # noqa: E731

    tokens = input_ids[0].tolist()
    cache, mtp_caches = KVCache(), [KVCache() for _ in range(depths)]
    # hidden[0]: the main model's last hidden state at positions 0..N-1; hidden[j + 1]: depth j's output
    hidden = [model.hidden_states(input_ids, cache)]
    hidden += [hidden[0][:, :0]] * depths

    def emit(token: int) -> bool:
        """Append a generated token; True when generation must stop."""
        tokens.append(token)
        stats.tokens += 1
        if on_token is not None:
            on_token(torch.tensor([token]))
        return stats.tokens >= max_new_tokens or token == eos_token_id

    done = emit(_draw(probs(model.head(hidden[0][:, -1])), generator))
    while not done:
        n = cache.length  # tokens[0..n] known, tokens[n] not yet seen by the main model
        drafts, draft_probs = [], []
        for j in range(min(depths, max_new_tokens - stats.tokens - 1)):
            start = mtp_caches[j].length
            ahead = tokens + drafts  # depth j at position i reads token i + 1 + j
            ids_1T = torch.tensor([ahead[start + 1 + j : n + 1 + j]])
            positions_1T = torch.arange(start, n)[None]
            h_1TD, _ = model.mtp_step(j, hidden[j][:, start:n], ids_1T, positions_1T, cache=mtp_caches[j])
            hidden[j + 1] = torch.cat((hidden[j + 1][:, :start], h_1TD), dim=1)
            q_V = probs(model.head(h_1TD[:, -1], j))
            drafts.append(_draw(q_V, generator))
            draft_probs.append(q_V)
        h_1KD = model.hidden_states(torch.tensor([[tokens[n], *drafts]]), cache)
        logits_KV = model.head(h_1KD)[0]
        stats.rounds += 1
        accepted = 0
        for j, (draft, q_V) in enumerate(zip(drafts, draft_probs, strict=True)):
            stats.checked_by_depth[j] += 1
            ok, token = accept_or_resample(probs(logits_KV[j : j + 1]), q_V, draft, generator)
            if ok:
                stats.accepted_by_depth[j] += 1
                accepted += 1
            done = emit(token)
            if not ok or done:
                break
        else:  # every draft accepted: the main model's prediction after the last one comes free
            done = emit(_draw(probs(logits_KV[-1:]), generator))
        stats.history.append((n + 1, drafts, accepted))
        cache.truncate(n + accepted + 1)
        hidden[0] = torch.cat((hidden[0], h_1KD[:, : accepted + 1]), dim=1)
        for j, mtp_cache in enumerate(mtp_caches):
            valid = max(0, min(mtp_cache.length, n + accepted - j))
            mtp_cache.truncate(valid)
            hidden[j + 1] = hidden[j + 1][:, :valid]
    return torch.tensor([tokens])
