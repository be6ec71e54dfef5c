"""moekit export-gguf: the gguf package's reader gets back every tensor under llama.cpp's names, each type stores
what the gguf package's own quantizer makes, and, where llama-cpp-python is installed, llama.cpp gives moekit's greedy
tokens at f32 for every architecture."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import hf_tiny_model  # noqa: E402

import moekit  # noqa: E402
from moekit.checkpoint.gguf_arch import arch_for, gguf_tensors  # noqa: E402
from moekit.checkpoint.gguf_export import export_gguf  # noqa: E402
from moekit.cli.main import main  # noqa: E402

# The tiny families as llama.cpp's architectures compute them (every layer MoE where the architecture has no dense
# ones, no clip_qkv, ...); hidden 64 so that rows are whole blocks of 32.
WIDE = dict(hidden_size=64, head_dim=16, intermediate_size=64, moe_intermediate_size=32)
EXPORTABLE = {
    "mixtral": ("llama", dict(sliding_window=None)),
    "qwen2_moe": ("qwen2moe", dict(decoder_sparse_step=1, shared_expert_intermediate_size=64)),
    "qwen3_moe": ("qwen3moe", dict(mlp_only_layers=[])),
    "olmoe": ("olmoe", dict(clip_qkv=None, num_key_value_heads=4)),
    "gpt_oss": ("gpt-oss", dict(intermediate_size=32)),
    "deepseek_v2": ("deepseek2", dict(n_group=1, topk_group=1, head_dim=4)),
    "deepseek_v3": ("deepseek2", dict(head_dim=4)),
}


def _model_dir(family: str, tmp_path: Path, **overrides) -> Path:
    hf_tiny_model(family, tmp_path / "hf", **{**WIDE, **EXPORTABLE[family][1], **overrides})
    return tmp_path / "hf"


@pytest.mark.parametrize("family", list(EXPORTABLE))
def test_reader_gets_back_every_tensor_under_llama_cpp_names(family, tmp_path):
    directory = _model_dir(family, tmp_path)
    report = export_gguf(directory, tmp_path / "m.gguf", "f32")
    assert report["architecture"] == EXPORTABLE[family][0]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    model = moekit.from_pretrained(directory, dtype=torch.float32)
    want = {t.name: t.get().numpy() for t in gguf_tensors(model, arch_for(model.config))}
    assert list(got) == list(want)
    for name, w in want.items():
        np.testing.assert_array_equal(got[name].reshape(w.shape), w, err_msg=name)
    # Every name is one llama.cpp's architecture declares, and the metadata says what the model is.
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == report["architecture"])
    declared = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    assert {re.sub(r"^blk\.\d+\.", "blk.{bid}.", n).rsplit(".", 1)[0] for n in got} <= declared
    fields = reader.fields
    prefix = report["architecture"]
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value(f"{prefix}.expert_count") == model.config.moe.routing.num_experts
    assert value(f"{prefix}.expert_used_count") == model.config.moe.routing.top_k
    assert value(f"{prefix}.block_count") == model.config.num_layers


def test_experts_and_queries_land_in_llama_cpp_orientation(tmp_path):
    """Mixtral: expert e's gate rows are transformers' w1 of expert e; llama's q rows are rope-pair permuted."""
    hf = hf_tiny_model("mixtral", tmp_path / "hf", **{**WIDE, **EXPORTABLE["mixtral"][1]})
    export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    experts = hf.model.layers[1].mlp.experts
    f = experts.down_proj.shape[-1]
    gate_up = experts.gate_up_proj.detach().numpy()  # [E, 2F, D]
    np.testing.assert_array_equal(got["blk.1.ffn_gate_exps.weight"], gate_up[:, :f])
    np.testing.assert_array_equal(got["blk.1.ffn_up_exps.weight"], gate_up[:, f:])
    q = hf.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    heads, half = hf.config.num_attention_heads, q.shape[0] // hf.config.num_attention_heads // 2
    permuted = got["blk.1.attn_q.weight"].reshape(heads, half, 2, -1)
    np.testing.assert_array_equal(permuted[:, :, 0], q.reshape(heads, 2, half, -1)[:, 0])
    np.testing.assert_array_equal(permuted[:, :, 1], q.reshape(heads, 2, half, -1)[:, 1])


@pytest.mark.parametrize("export_type", ["f16", "bf16", "q8_0", "q4_0", "mxfp4"])
def test_each_type_stores_what_the_gguf_quantizer_makes(export_type, tmp_path):
    directory = _model_dir("qwen3_moe", tmp_path, vocab_size=100)
    report = export_gguf(directory, tmp_path / "m.gguf", export_type)
    model = moekit.from_pretrained(directory, dtype=torch.float32)
    Q = gguf.GGMLQuantizationType
    matrix = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "mxfp4": Q.Q8_0}[export_type]
    experts = Q.MXFP4 if export_type == "mxfp4" else matrix
    want = {t.name: t for t in gguf_tensors(model, arch_for(model.config))}
    for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors:
        kind = want[t.name].kind
        expected = {"vector": Q.F32, "router": Q.F32, "experts": experts}.get(kind, matrix)
        assert t.tensor_type == expected, t.name
        w = want[t.name].get().numpy()
        stored = gguf.quants.quantize(w, expected) if expected != Q.F32 else w
        np.testing.assert_array_equal(np.asarray(t.data).reshape(stored.shape), stored, err_msg=t.name)
    assert sum(s["tensors"] for s in report["storage"].values()) == len(want)


def test_rows_that_are_not_whole_blocks_stay_fp32(tmp_path):
    directory = _model_dir("qwen3_moe", tmp_path, moe_intermediate_size=24)  # down rows of 24: not blocks of 32
    export_gguf(directory, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down_exps.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q8_0


def test_a_quantized_checkpoint_exports_its_dequantized_weights(tmp_path):
    from moekit.quant.quantize import quantize_checkpoint

    directory = _model_dir("qwen3_moe", tmp_path)
    quantize_checkpoint(directory, tmp_path / "q4", "experts=q4")
    export_gguf(tmp_path / "q4", tmp_path / "m.gguf", "f32")
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    held = moekit.from_pretrained(tmp_path / "q4").layers[0].mlp.experts
    down = held.dequantized("down_proj", torch.float32).numpy()
    np.testing.assert_array_equal(got["blk.0.ffn_down_exps.weight"], down)


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("qwen3_moe", dict(norm_topk_prob=False), "top-k weights not renormalised"),
        ("qwen3_moe", dict(mlp_only_layers=[1]), "dense FFN layers"),
        ("olmoe", dict(num_key_value_heads=2), "grouped-query attention"),
        ("deepseek_v2", dict(n_group=4, topk_group=2), "groups scored by their best expert"),
    ],
)
def test_models_llama_cpp_cannot_compute_are_refused(family, overrides, message, tmp_path):
    directory = _model_dir(family, tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        export_gguf(directory, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".m.gguf*"))


def test_cli_reports_and_refuses_cleanly(tmp_path, capsys):
    directory = _model_dir("qwen3_moe", tmp_path)
    assert main(["export-gguf", str(directory), str(tmp_path / "m.gguf"), "--type", "q8_0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["storage"]["Q8_0"]["tensors"] > 0 and (tmp_path / "m.gguf").stat().st_size > 0
    assert main(["export-gguf", str(directory), str(tmp_path / "m.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err
    hf_tiny_model("phimoe", tmp_path / "phi")
    capsys.readouterr()
    assert main(["export-gguf", str(tmp_path / "phi"), str(tmp_path / "p.gguf")]) == 2
    err = capsys.readouterr().err
    assert "phimoe" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.gguf").exists() and not list(tmp_path.glob(".p.gguf*"))


def _llama(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)


@pytest.mark.parametrize("family", list(EXPORTABLE))
def test_llama_cpp_gives_moekits_greedy_tokens_at_f32(family, tmp_path):
    pytest.importorskip("llama_cpp")
    directory = _model_dir(family, tmp_path)
    export_gguf(directory, tmp_path / "m.gguf", "f32")
    llm = _llama(tmp_path / "m.gguf")
    model = moekit.from_pretrained(directory, dtype=torch.float32)
    prompt = torch.randint(0, model.config.vocab_size, (12,)).tolist()
    llm.eval(prompt)
    logits = torch.tensor(np.array(llm.scores[: len(prompt)]))
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    assert (logits - ours).abs().max() / ours.abs().max() < 2e-3  # llama.cpp keeps its KV cache in f16
    want = model.generate(torch.tensor([prompt]), 12)[0, len(prompt) :].tolist()
    got = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(token)
        if len(got) == len(want):
            break
    assert got == want


def test_byte_vocabulary_is_exactly_moekits_bytes(tmp_path):
    pytest.importorskip("llama_cpp")
    directory = _model_dir("deepseek_v3", tmp_path, vocab_size=256)
    export_gguf(directory, tmp_path / "m.gguf", "f32")
    llm = _llama(tmp_path / "m.gguf")
    text = "def f(x):\n\treturn x ** 2  # é, ü, \x00\x7f"
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ids == list(text.encode()) and llm.detokenize(ids) == text.encode()
