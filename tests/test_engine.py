"""The continuous-batching engine: every request gets exactly what it would get alone (greedy and seeded sampled),
whatever else runs beside it, whenever it arrives, however its prompt is chunked; slots, queue and cancellation."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import FAMILIES, hf_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekit
from moekit.infer.slots import SlotKVCache
from moekit.serve.engine import Engine, QueueFull, Request, SamplingParams

_MODELS: dict = {}


def _model(family: str, tmp_path_factory):
    if family not in _MODELS:
        directory = tmp_path_factory.mktemp(family)
        hf_tiny_model(family, directory)
        _MODELS[family] = moekit.from_pretrained(directory).eval()
    return _MODELS[family]


def _alone(model, prompt: list[int], p: SamplingParams) -> list[int]:
    out = model.generate(torch.tensor([prompt]), p.max_tokens, temperature=p.temperature, top_k=p.top_k, seed=p.seed)
    return out[0, len(prompt) :].tolist()


def _run(engine: Engine, prompts, params, arrivals: list[int]) -> list[list[int]]:
    """Requests i joins before step arrivals[i]; runs until every one is done."""
    outs: list[list[int]] = [[] for _ in prompts]
    requests = [
        Request(p, sp, lambda ev, out=out: out.append(ev.token))
        for p, sp, out in zip(prompts, params, outs, strict=True)
    ]
    step = 0
    while step <= max(arrivals) or engine.has_work():
        for request, at in zip(requests, arrivals, strict=True):
            if at == step:
                engine.add(request)
        engine.step()
        step += 1
    return outs


def _requests(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (n,), generator=g).tolist()
    prompts = [torch.randint(3, 96, (t,), generator=g).tolist() for t in lengths]
    params = [
        SamplingParams(
            max_tokens=3 + 5 * (i % 4), temperature=0.0 if i % 2 == 0 else 0.9, top_k=0 if i % 3 else 8, seed=i
        )
        for i in range(n)
    ]
    return prompts, params


@pytest.mark.parametrize("family", FAMILIES)
def test_each_request_gets_what_it_gets_alone(family, tmp_path_factory):
    """Greedy and seeded sampled requests arriving at different steps, fewer slots than requests (so some wait), and
    prompts longer than a prefill chunk: every continuation equals the model's own generate for that prompt alone."""
    model = _model(family, tmp_path_factory)
    if model.config.attention.linear_layers:  # recurrent states have no slots in the engine's cache yet
        with pytest.raises(ValueError, match="linear-attention layers is not supported yet"):
            Engine(model)
        return
    prompts, params = _requests(6)
    alone = [_alone(model, p, sp) for p, sp in zip(prompts, params, strict=True)]
    engine = Engine(model, max_batch=3, context=64, prefill_chunk=5)
    assert _run(engine, prompts, params, [0, 0, 1, 2, 6, 7]) == alone
    assert engine.num_running() == 0 and engine.cache.used_tokens() == 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arrivals=st.lists(st.integers(0, 12), min_size=1, max_size=7),
    max_batch=st.integers(1, 4),
    chunk=st.integers(1, 24),
)
def test_any_schedule_gives_each_request_its_own_tokens(arrivals, max_batch, chunk, tmp_path_factory):
    model = _model("qwen3_moe", tmp_path_factory)
    prompts, params = _requests(len(arrivals), seed=len(arrivals))
    alone = [_alone(model, p, sp) for p, sp in zip(prompts, params, strict=True)]
    engine = Engine(model, max_batch=max_batch, context=48, prefill_chunk=chunk)
    assert _run(engine, prompts, params, arrivals) == alone


def test_longrope_rows_pick_their_own_factors(tmp_path_factory):
    """phimoe's longrope switches factors past 64 positions: a row beyond it and a row before it, decoding together,
    each match their own generation alone."""
    model = _model("phimoe", tmp_path_factory)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 96, (t,), generator=g).tolist() for t in (60, 4)]
    params = [SamplingParams(max_tokens=10), SamplingParams(max_tokens=10)]
    alone = [_alone(model, p, sp) for p, sp in zip(prompts, params, strict=True)]
    assert _run(Engine(model, max_batch=2, context=80), prompts, params, [0, 0]) == alone


def test_logprobs_stop_tokens_and_the_context(tmp_path_factory):
    model = _model("mixtral", tmp_path_factory)
    prompt = [5, 6, 7]
    greedy = _alone(model, prompt, SamplingParams(max_tokens=8))
    events = []
    engine = Engine(model, max_batch=2, context=32)
    stop = SamplingParams(max_tokens=8, logprobs=3, stop_token_ids=(greedy[4],))
    engine.add(Request(prompt, stop, events.append))
    while engine.has_work():
        engine.step()
    assert [e.token for e in events] == greedy[: greedy.index(greedy[4]) + 1]
    assert events[-1].finish_reason == "stop" and all(e.finish_reason is None for e in events[:-1])
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].log_softmax(-1)
    assert events[0].logprob == pytest.approx(float(logits.max()), abs=1e-5)
    assert [t for t, _ in events[0].top] == logits.topk(3).indices.tolist()
    with pytest.raises(ValueError, match="allowed context=32"):
        engine.add(Request(list(range(3, 30)), SamplingParams(max_tokens=8), events.append))


def test_queue_bound_and_cancellation_free_the_slots(tmp_path_factory):
    model = _model("mixtral", tmp_path_factory)
    engine = Engine(model, max_batch=1, context=32, max_queue=1)
    got: list[list[int]] = [[], []]
    first = Request([5, 6], SamplingParams(max_tokens=20), lambda ev: got[0].append(ev.token))
    second = Request([7, 8], SamplingParams(max_tokens=4), lambda ev: got[1].append(ev.token))
    engine.add(first)
    engine.step()  # first takes the one slot: prefill (its first token) and a decode (its second)
    engine.add(second)
    with pytest.raises(QueueFull):
        engine.add(Request([9], SamplingParams(), lambda ev: None))
    engine.step()
    engine.cancel(first)
    while engine.has_work():
        engine.step()
    assert len(got[0]) == 3 and got[1] == _alone(model, [7, 8], SamplingParams(max_tokens=4))
    assert engine.cache.used_tokens() == 0


def test_slot_cache_moves_and_bounds():
    cache = SlotKVCache(3, 8)
    view = cache.rows(0, 3)
    k_BHTd = torch.randn(3, 2, 4, 5)
    view.extend(0, (2,), k_BHTd)
    view.advance(4)
    cache.move(2, 0)
    assert cache.lengths == [4, 4, 0]
    assert torch.equal(cache.rows(0, 1).extend(0, (2,), k_BHTd[:1, :, :1])[0][0, :, :4], k_BHTd[2])
    with pytest.raises(ValueError, match="allowed context=8"):
        cache.rows(1, 1).extend(0, (2,), torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="slots 2..3 are invalid"):
        cache.rows(2, 2)


ROWS_FAMILIES = ["qwen3_moe", "gpt_oss", "olmoe", "qwen2_moe", "deepseek_v3", "deepseek_v32", "mistral4"]


@pytest.mark.parametrize("family", ROWS_FAMILIES)
def test_fused_rows_step_equals_the_modules(family, tmp_path_factory, monkeypatch):
    """A ragged decode batch through the fused steps' rows form (attention and FFN blocks, one call each per
    layer) gives the modules' logits; MLA's rows read their latent caches (DeepSeek-V3.2's indexer picks 5 of the
    longer rows' keys), Mistral 4's queries scale by each row's own position."""
    from moekit.infer import fast
    from moekit.infer.fast import prepare_inference

    taken = []
    rows = fast._AttentionStep._rows

    def counted(self, *args):
        out = rows(self, *args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(fast._AttentionStep, "_rows", counted)

    model = _model(family, tmp_path_factory)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 96, (1, n), generator=g) for n in (7, 3, 12)]
    logits = []
    for fused in (True, False):
        prepare_inference(model) if fused else model.drop_fused()
        cache = SlotKVCache(3, 32)
        with torch.no_grad():
            for i, p in enumerate(prompts):
                model(p, cache=cache.rows(i, 1))
            logits.append(model(torch.tensor([[4], [5], [6]]), cache=cache.rows(0, 3)))
    assert (logits[0] - logits[1]).norm() / logits[1].norm() < 1e-5
    assert taken == [True] * model.config.num_layers


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_prompts_prefilled_together_equal_each_alone(family, tmp_path_factory):
    """Prompts of different lengths that fit one step's budget are prefilled as one right-padded batch: all four
    decode from the first step on, and each gets its own tokens."""
    model = _model(family, tmp_path_factory)
    prompts, params = _requests(4, seed=9)
    alone = [_alone(model, p, sp) for p, sp in zip(prompts, params, strict=True)]
    engine = Engine(model, max_batch=4, context=64, prefill_chunk=sum(len(p) for p in prompts))
    outs = [[] for _ in prompts]
    for p, sp, out in zip(prompts, params, outs, strict=True):
        engine.add(Request(p, sp, lambda ev, out=out: out.append(ev.token)))
    stats = engine.step()
    assert stats.prefill_tokens == sum(len(p) for p in prompts) and stats.first_tokens == 4
    while engine.has_work():
        engine.step()
    assert outs == alone
