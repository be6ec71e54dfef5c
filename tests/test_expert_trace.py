"""Routing traces and the expert-cache simulator: Belady on a hand-made trace, Belady at least as good as every
policy on any trace, a model's trace through real files and both commands."""

import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.cli.main import main
from moekit.config.model import ModelConfig
from moekit.config.moe import MoEConfig
from moekit.infer.expert_trace import POLICIES, ExpertTrace, record_trace, simulate
from moekit.routing.spec import RoutingSpec


def _trace(ids: list[list[list[int]]], experts: int = 8) -> ExpertTrace:
    t = torch.tensor(ids)
    return ExpertTrace(t, list(range(t.shape[1])), experts, 1000)


def test_belady_and_lru_on_a_cycle():
    """A B C A B C with 2 slots: LRU always evicts the next one needed (no hit); Belady keeps A for step 4, then C
    for step 6: 2 hits, the most any policy can have."""
    trace = _trace([[[0]], [[1]], [[2]], [[0]], [[1]], [[2]]])
    assert simulate(trace, 2, "lru")["hits"] == 0
    best = simulate(trace, 2, "belady")
    assert best["hits"] == 2 and best["misses"] == 4 and best["bytes_read"] == 4000


def test_a_layer_s_experts_are_never_evicted_for_each_other():
    """Two slots, k = 2: both experts of a step stay (none is evicted to make room for the other)."""
    trace = _trace([[[0, 1]], [[2, 3]], [[0, 1]]])
    for policy in POLICIES:
        assert simulate(trace, 2, policy)["misses"] == 6


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.integers(2, 8), st.data())
def test_belady_is_the_best(layers, k, slots_extra, data):
    tokens = data.draw(st.integers(1, 30))
    ids = [
        [data.draw(st.lists(st.integers(0, 5), min_size=k, max_size=k, unique=True)) for _ in range(layers)]
        for _ in range(tokens)
    ]
    trace = _trace(ids, 6)
    slots = k + slots_extra
    best = simulate(trace, slots, "belady")["hits"]
    for policy in POLICIES:
        r = simulate(trace, slots, policy)
        assert r["hits"] <= best and r["hits"] + r["misses"] == sum(len(set(c)) for t in ids for c in t)


def _model():
    torch.manual_seed(0)
    moe = MoEConfig(routing=RoutingSpec(num_experts=8, top_k=2, normalize=True), expert_hidden=32)
    return moekit.from_config(
        ModelConfig(
            hidden_size=32,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            moe=moe,
            vocab_size=256,
            moe_layers=(1, 2),
            dense_hidden=64,
        )
    ).eval()


def test_record_save_load(tmp_path):
    model = _model()
    batches = [torch.randint(0, 256, (2, 10)), torch.randint(0, 256, (1, 7))]
    trace = record_trace(model, batches, "tiny")
    assert trace.ids.shape == (27, 2, 2) and trace.layers == [1, 2] and trace.experts == 8
    assert trace.expert_bytes == sum(p[0].numel() * 4 for p in model.layers[1].mlp.experts.parameters())
    with torch.no_grad():
        out = model(batches[0], return_routing=True)
    assert torch.equal(trace.ids[:20, 0], out.moe[1].topk_ids_TK.int())
    # layer 2's router on layer 1's input, one layer early
    assert (trace.predicted[:, 0] == -1).all() and trace.predicted[:, 1].min() >= 0
    seen = []
    hook = model.layers[1].mlp.register_forward_pre_hook(lambda _, a: seen.append(a[0]))
    with torch.no_grad():
        model(batches[0])
        early = model.layers[2].mlp.router(seen[0].reshape(-1, 32)).topk_ids_TK
    hook.remove()
    assert torch.equal(trace.predicted[:20, 1], early.int())
    trace.save(tmp_path / "t.safetensors")
    again = ExpertTrace.load(tmp_path / "t.safetensors")
    assert torch.equal(again.ids, trace.ids.long()) and again.layers == [1, 2] and again.model == "tiny"
    assert torch.equal(again.predicted, trace.predicted.long())


def test_trace_and_cache_sim_commands(tmp_path, capsys):
    moekit.save_pretrained(_model(), tmp_path / "m")
    data = tmp_path / "text.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 80)
    out = tmp_path / "trace.safetensors"
    args = ["trace", str(tmp_path / "m"), "--data", str(data), "--out", str(out), "--tokens", "512"]
    assert main([*args, "--seq-len", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 512
    assert main(["cache-sim", str(out), "--budget", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rates = {r["policy"]: r["hit_rate"] for r in result["policies"]}
    assert result["slots"] == 6 and set(rates) == set(POLICIES) and max(rates.values()) == rates["belady"]
    assert main(["cache-sim", str(out), "--budget", "6", "--prefetch", "--policies", "lru", "--json"]) == 0
    assert [r["policy"] for r in json.loads(capsys.readouterr().out)["policies"]] == ["lru", "lru+prefetch"]
    assert main(["cache-sim", str(out), "--budget", "lots"]) == 2
    assert "--budget='lots' is invalid" in capsys.readouterr().err
    assert main(["cache-sim", str(data), "--budget", "6"]) == 2
    assert "not a moekit trace" in capsys.readouterr().err


def test_prefetch_reads_the_next_layer_ahead():
    """Two layers, k = 1, 2 slots: a right prediction makes every second-layer request a hit (its expert was read
    ahead), a wrong one costs a wasted read and leaves the request a miss."""
    ids = [[[0], [1]], [[2], [3]], [[4], [5]]]
    right = _trace(ids)
    right.predicted = torch.tensor([[[-1], [1]], [[-1], [3]], [[-1], [5]]])
    r = simulate(right, 2, "lru", prefetch=True)
    assert (r["hits"], r["misses"], r["prefetched"], r["prefetch_wasted"]) == (3, 3, 3, 0)
    wrong = _trace(ids)
    wrong.predicted = torch.tensor([[[-1], [7]], [[-1], [7]], [[-1], [6]]])
    r = simulate(wrong, 2, "lru", prefetch=True)
    assert r["hits"] == 0 and r["prefetch_wasted"] == r["prefetched"] == 3  # expert 7 read twice: evicted between
    assert r["bytes_read"] == (6 + 3) * 1000
    assert right.prediction_quality() == {"precision": 1.0, "recall": 1.0}
