"""Gated DeltaNet (Qwen3-Next's linear attention): the chunked form equals the token-by-token recurrence (outputs,
final state and gradients) across chunk boundaries; a cached decode continues a prompt exactly as one pass over
the whole sequence; the recurrent state is counted once per sequence by the planner; what cannot use it refuses."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.infer.cache import KVCache
from moekit.layers.linear_attention import chunked_delta_rule, l2_normalise, recurrent_delta_rule
from moekit.plan.model_stats import model_stats

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import hf_tiny_model  # noqa: E402

pytest.importorskip("transformers")


def _inputs(b: int, h: int, t: int, dk: int, dv: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = l2_normalise(torch.randn(b, h, t, dk, generator=g, dtype=torch.float64)) * dk**-0.5
    k = l2_normalise(torch.randn(b, h, t, dk, generator=g, dtype=torch.float64))
    v = torch.randn(b, h, t, dv, generator=g, dtype=torch.float64)
    decay = -torch.rand(b, h, t, generator=g, dtype=torch.float64) * 2  # log-decays <= 0
    beta = torch.rand(b, h, t, generator=g, dtype=torch.float64)
    state = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64)
    return q, k, v, decay, beta, state


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([1, 5, 63, 64, 65, 130]), st.sampled_from([4, 16, 64]), st.integers(0, 10_000))
def test_chunked_equals_the_recurrence(t, chunk, seed):
    q, k, v, decay, beta, state = _inputs(2, 3, t, 8, 5, seed)
    out_r, state_r = recurrent_delta_rule(q, k, v, decay, beta, state)
    out_c, state_c = chunked_delta_rule(q, k, v, decay, beta, state, chunk)
    assert torch.allclose(out_c, out_r, atol=1e-10) and torch.allclose(state_c, state_r, atol=1e-10)


def test_training_through_chunks_gives_the_recurrence_s_gradients():
    tensors = [x.requires_grad_() for x in _inputs(1, 2, 70, 8, 6, 7)]
    grads = []
    for rule in (recurrent_delta_rule, chunked_delta_rule):
        out, state = rule(*tensors)
        (out.square().sum() + state.sum()).backward()
        grads.append([x.grad.clone() for x in tensors])
        for x in tensors:
            x.grad = None
    for recurrent, chunked in zip(*grads, strict=True):
        assert torch.allclose(chunked, recurrent, atol=1e-9)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_next")
    return hf_tiny_model("qwen3_next", path), moekit.from_pretrained(path)


@pytest.fixture(scope="module")
def qwen3_next(both):
    return both[1]


def test_transformers_logits_past_two_chunks(both):
    """130 tokens (chunks of 64, 64 and 2) in a batch of two: transformers' logits."""
    hf, model = both
    ids = torch.randint(3, 96, (2, 130), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out = hf(ids).logits, model(ids)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


@torch.no_grad()
def _stepwise_and_whole(model, ids: torch.Tensor, prompt: int):
    """(logits of the first `prompt` tokens as one cached pass, then the rest one token at a time; logits of one
    uncached pass over all of ids; the cache)."""
    cache = KVCache()
    steps = [model(ids[:, :prompt], cache=cache)]
    steps += [model(ids[:, i : i + 1], cache=cache) for i in range(prompt, ids.shape[1])]
    return torch.cat(steps, dim=1), model(ids), cache


@pytest.mark.parametrize("prompt", [1, 60, 64, 70])
def test_cached_decode_equals_one_pass(qwen3_next, prompt):
    """A prompt, then tokens one by one through the cache (crossing the 64-token chunk at 64): the logits of one
    pass over the whole sequence."""
    ids = torch.randint(3, 96, (2, prompt + 8), generator=torch.Generator().manual_seed(prompt))
    stepwise, whole, cache = _stepwise_and_whole(qwen3_next, ids, prompt)
    assert torch.allclose(stepwise, whole, atol=2e-5, rtol=1e-4)
    assert cache.nbytes() > 0
    with pytest.raises(ValueError, match="cannot forget tokens"):
        cache.truncate(prompt)


def test_the_state_is_counted_once_per_sequence(qwen3_next):
    """Three of the four layers are Gated DeltaNet: the cache grows by the one attention layer's keys and values per
    token, the states are a constant."""
    stats = model_stats(qwen3_next.config)
    cfg = qwen3_next.config
    per_token = cfg.num_kv_heads * (cfg.head_dim + cfg.value_dim)
    assert stats.kv_bytes_per_token(2) == per_token * 2
    a = cfg.attention
    state = a.linear_value_heads * a.linear_key_dim * a.linear_value_dim
    conv = (2 * a.linear_key_heads * a.linear_key_dim + a.linear_value_heads * a.linear_value_dim) * (a.linear_conv - 1)
    for context in (10, 1000):
        assert stats.kv_bytes_per_sequence(context, 2) == (per_token * context + 3 * (state + conv)) * 2


def test_the_hybrid_preset_trains_and_generates(tmp_path, capsys):
    """moekit train --preset tiny-hybrid: the loss falls through the chunked delta rule's gradients; the final
    model continues a prompt through the recurrent states."""
    import json

    from moekit.cli.main import main

    run = tmp_path / "run"
    flags = ["--steps", "12", "--batch-size", "4", "--seq-len", "80", "--eval-every", "12", "--json"]
    assert main(["train", "--preset", "tiny-hybrid", "--out", str(run), *flags]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["last_loss"] < result["first_loss"] - 0.5
    assert main(["generate", str(run), "def ", "--max-new-tokens", "8", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 8


@pytest.mark.parametrize("family", ["jamba", "granitemoehybrid"])
@pytest.mark.parametrize("prompt", [1, 9])
def test_mamba_layers_decode_from_their_states(tmp_path, family, prompt):
    """Jamba (Mamba-1) and Granite 4.0-H (Mamba-2, heads sharing B and C by group): a cached decode equals one pass
    over the sequence, and the planner counts each Mamba layer's scan state and convolution tail once per
    sequence."""
    hf_tiny_model(family, tmp_path)
    model = moekit.from_pretrained(tmp_path)
    ids = torch.randint(3, 96, (2, prompt + 6), generator=torch.Generator().manual_seed(prompt))
    stepwise, whole, _ = _stepwise_and_whole(model, ids, prompt)
    assert torch.allclose(stepwise, whole, atol=2e-5, rtol=1e-4)
    a, cfg = model.config.attention, model.config
    inner = a.mamba_expand * cfg.hidden_size
    conv = inner if family == "jamba" else inner + 2 * a.mamba_groups * a.mamba_state  # Mamba-2 convolves B, C too
    layers = len(a.linear_layers)
    assert model_stats(cfg).state_elements == layers * (inner * a.mamba_state + conv * (a.mamba_conv - 1))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([1, 7, 8, 9, 30]), st.sampled_from([4, 8, 16]), st.integers(0, 10_000))
def test_mamba2_chunks_equal_its_recurrence(t, chunk, seed):
    """Mamba-2's chunked scan (state space duality) equals the token-by-token scan: outputs and the final state,
    across chunk boundaries and from a carried state."""
    from moekit.layers.mamba import chunked_ssd_scan, ssd_scan

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, 3, 4, generator=g, dtype=torch.float64)
    dt = torch.rand(2, t, 3, generator=g, dtype=torch.float64)
    A = -torch.rand(3, generator=g, dtype=torch.float64) * 2
    B, C = (torch.randn(2, t, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    state = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    y_r, s_r = ssd_scan(x, dt, A, B, C, state)
    y_c, s_c = chunked_ssd_scan(x, dt, A, B, C, state, chunk)
    assert torch.allclose(y_c, y_r, atol=1e-10) and torch.allclose(s_c, s_r, atol=1e-10)
