"""experts=auto: a format per routed expert from calibration, within a byte budget. The choice is the best within
the budget that the greedy exchange can find (checked against brute force), the checkpoint it writes holds each
expert in its format, loads as MixedExperts, computes the model of its dequantized weights, and saves back bit for
bit; requests it cannot honour fail with one line."""

import json
import sys
from itertools import product
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.cli.main import main
from moekit.experts.mixed import MixedExperts
from moekit.quant.held import set_int8_activations
from moekit.quant.mixed import ExpertStats, choose
from moekit.quant.quantize import quantize_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import hf_tiny_model  # noqa: E402
from test_checkpoint import _tokenizer  # noqa: E402
from test_quant_load import _read  # noqa: E402
from test_quantize import _dequantized_twin  # noqa: E402

pytest.importorskip("transformers")
CANDIDATES = ("q2", "q4", "q8")


def _stats(err, costs) -> ExpertStats:
    err_EC = torch.tensor(err, dtype=torch.float64)
    bytes_EC = torch.tensor([costs] * len(err), dtype=torch.float64)
    return ExpertStats("layers.1.mlp.experts", 1, [1] * len(err), err_EC, bytes_EC)


def test_the_busy_expert_gets_the_bits():
    # expert 0 carries most of the error (many tokens); one upgrade to 8 bits fits
    stats = _stats([[100.0, 50.0, 1.0], [4.0, 2.0, 0.1], [4.0, 2.0, 0.1]], [2.0, 4.0, 8.0])
    assert choose([stats], budget_bytes=14.0, candidates=CANDIDATES) == {stats.module: ["q8", "q4", "q2"]}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(1, 100), st.floats(0.1, 1.0), st.floats(0.0, 1.0)).map(
            lambda t: [t[0], t[0] * t[1], t[0] * t[1] * t[2]]  # error falls with bits
        ),
        min_size=1,
        max_size=4,
    ),
    st.floats(0.0, 1.0),
)
def test_choice_fits_the_budget_and_is_near_the_best(err, where):
    costs = [2.0, 4.5, 8.5]
    stats = _stats(err, costs)
    n = len(err)
    budget = costs[0] * n + where * (costs[-1] - costs[0]) * n
    plan = choose([stats], budget, CANDIDATES)[stats.module]
    picked = [CANDIDATES.index(c) for c in plan]
    assert sum(costs[c] for c in picked) <= budget + 1e-9
    best = min(
        sum(err[e][c] for e, c in enumerate(combo))
        for combo in product(range(3), repeat=n)
        if sum(costs[c] for c in combo) <= budget + 1e-9
    )
    # the greedy exchange along convex hulls is within one expert's step of the optimum
    step = max(row[0] - row[2] for row in err)
    assert sum(err[e][c] for e, c in enumerate(picked)) <= best + step + 1e-9


def _auto_checkpoint(tmp_path: Path, target_bits: float = 5.5) -> dict:
    hf_tiny_model("deepseek_v3", tmp_path / "hf")
    _tokenizer(tmp_path / "hf")
    text = tmp_path / "calibration.txt"
    text.write_text(Path(json.__file__).read_text() * 4)
    return quantize_checkpoint(
        tmp_path / "hf",
        tmp_path / "q",
        "experts=auto,attention=q8",
        target_bits=target_bits,
        calibration=str(text),
        calibration_tokens=2048,
    )


def test_auto_checkpoint_holds_each_expert_in_its_format(tmp_path):
    report = _auto_checkpoint(tmp_path)
    auto = report["experts_auto"]
    assert auto["bits_per_weight"] <= 5.5 and sum(1 for n in auto["experts_per_format"].values() if n) >= 2
    saved = json.loads((tmp_path / "q" / "expert_formats.json").read_text())
    assert saved["layers"] == auto["layers"]
    model = moekit.from_pretrained(tmp_path / "q", dtype=torch.float32)
    for module, layer in saved["layers"].items():
        experts = model.get_submodule(module)
        names = {"q2": "int2", "q4": "int4", "q4m": "int4_asym", "q8": "int8"}
        held = [experts.formats[experts.place_E[e][0]].name for e in range(experts.num_experts)]
        assert held == [names[f] for f in layer["formats"]]
    assert any(isinstance(m, MixedExperts) for m in model.modules())
    # the dequantized twin computes the same logits; greedy decoding (one-token path) the same tokens
    twin = _dequantized_twin(tmp_path / "hf", model)
    set_int8_activations(model, False)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(ids), twin(ids)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5
    assert torch.equal(model.generate(ids[:1], 8), twin.generate(ids[:1], 8))
    # save writes the same files back
    moekit.save_pretrained(model, tmp_path / "again")
    written, again = _read(tmp_path / "q"), _read(tmp_path / "again")
    assert written.keys() == again.keys() and all(torch.equal(written[k], again[k]) for k in written)


def test_quantize_command_prints_and_saves_the_choice(tmp_path, capsys):
    hf_tiny_model("qwen3_moe", tmp_path / "hf")
    _tokenizer(tmp_path / "hf")
    out = tmp_path / "q"
    args = ["quantize", str(tmp_path / "hf"), "--out", str(out), "--weights", "experts=auto,rest=q8"]
    args += ["--target-bits", "4.5", "--calibration", str(Path(json.__file__)), "--calibration-tokens", "1024"]
    assert main([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["experts_auto"]["layers"] == json.loads((out / "expert_formats.json").read_text())["layers"]
    assert printed["classes"]["experts"]["format"] == "auto"


@pytest.mark.parametrize(
    "family, kwargs, message",
    [
        ("deepseek_v3", {}, "one budget"),
        ("deepseek_v3", {"target_bits": 4.0, "target_gb": 1.0}, "one budget"),
        ("deepseek_v3", {"target_bits": 1.0}, "below every expert in q2"),
        ("gpt_oss", {"target_bits": 4.5}, "stack each layer's experts in one tensor"),
    ],
)
def test_auto_refusals(family, kwargs, message, tmp_path):
    hf_tiny_model(family, tmp_path / "hf")
    _tokenizer(tmp_path / "hf")
    text = str(Path(json.__file__))
    with pytest.raises(ValueError, match=message):
        quantize_checkpoint(tmp_path / "hf", tmp_path / "q", "experts=auto", calibration=text, **kwargs)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="target_bits / target_gb are for experts=auto"):
        quantize_checkpoint(tmp_path / "hf", tmp_path / "q", "experts=q4", target_bits=4.0)
    with pytest.raises(ValueError, match="not while loading"):
        moekit.from_pretrained(tmp_path / "hf", quantize="experts=auto")


def test_fused_decode_reads_each_experts_format(tmp_path):
    """The one-call decode step takes a MixedExperts layer (each format's stack through its kernel): the same logits
    as the modules' one-token path, which reads the same bytes with the same int8 activations."""
    from moekit.infer.cache import KVCache
    from moekit.infer.fast import prepare_inference

    hf_tiny_model("qwen3_moe", tmp_path / "hf", moe_intermediate_size=32, hidden_size=64)
    _tokenizer(tmp_path / "hf")
    report = quantize_checkpoint(
        tmp_path / "hf",
        tmp_path / "q",
        "experts=auto",
        target_bits=6.0,
        calibration=str(Path(json.__file__)),
        calibration_tokens=1024,
        candidates=("q4", "q8"),  # formats the kernels read
    )
    assert all(report["experts_auto"]["experts_per_format"].values())
    model = moekit.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert any(isinstance(m, MixedExperts) for m in model.modules())
    covered = prepare_inference(model)
    assert covered["chain"] and covered["ffn"] == list(range(model.config.num_layers))
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    logits = {}
    with torch.no_grad():
        for fused in (True, False):
            if not fused:
                model.drop_fused()
            cache = KVCache()
            model(ids[:, :-1], cache=cache)
            logits[fused] = model(ids[:, -1:], cache=cache)
    assert float((logits[True] - logits[False]).abs().max() / logits[False].abs().max()) < 1e-5
