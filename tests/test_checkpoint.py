"""Hugging Face checkpoints: every family loads from the files transformers itself writes and gives transformers'
logits and greedy tokens; moekit's save loads back into transformers unchanged; lazy loading; one-line errors.

The tiny configs (tests/hf_tiny.py) switch on each family's particulars: Mixtral's sliding window, Qwen2-MoE's gated
shared expert and sparse step, Qwen3-MoE's mlp_only_layers, OLMoE's clip_qkv and full-projection QK-norm, DeepSeek
V2/V3's MLA with yarn, groups and dense first layers, GLM-4.5's partial rotary, Phi-3.5-MoE's SparseMixer,
LayerNorms, head bias and longrope, DBRX's fused Wqkv and expert matrices, GPT-OSS's sinks, alternating sliding
layers and yarn, Llama 4's chunked attention, NoPE layers, temperature tuning, L2 QK-norm and llama3 rope."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.checkpoint.files import SafetensorsFile

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import FAMILIES, SHARDED, WRAPPED, hf_class, hf_tiny_model  # noqa: E402
from peak_memory import loading_growth  # noqa: E402

transformers = pytest.importorskip("transformers")


def _tensors(directory: Path) -> dict:
    out = {}
    for file in directory.glob("*.safetensors"):
        f = SafetensorsFile(file)
        out.update({name: (shape, dtype) for name, (dtype, shape, _, _) in f.entries.items()})
    return out


def _right_padded_logits(hf, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, transformers' logits) of a batch of two sequences, the second right-padded, after checking
    moekit's logits on its real tokens against transformers' (4e-8 to 2e-7 relative measured)."""
    ids = torch.randint(3, 96, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids, mask)
    assert float((out[real] - ref[real]).norm() / ref[real].norm()) < 1e-6
    return ids, mask, ref


@pytest.mark.parametrize("family", FAMILIES)
def test_load_generate_save_round_trip(family, tmp_path):
    hf = hf_tiny_model(family, tmp_path / "hf")
    if family in SHARDED:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = moekit.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids, mask, ref = _right_padded_logits(hf, model)
    # a row of a left-padded batch is that sequence alone (chunks, windows and positions skip the padding)
    left = torch.ones(2, 12, dtype=torch.long)
    left[1, :5] = 0
    with torch.no_grad():
        padded, alone = model(ids, left)[1, 5:], model(ids[1:, 5:])[0]
    assert float((padded - alone).norm() / alone.norm()) < 1e-4  # 4e-8 to 3e-5 (DBRX) measured; Llama 4 was 0.7

    prompt = ids[:1, :9]
    hf.generation_config.eos_token_id = None
    expected = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, 16).tolist() == expected.tolist()

    moekit.save_pretrained(model, tmp_path / "out", max_shard_bytes=60_000 if family in SHARDED else 5 * 2**30)
    assert _tensors(tmp_path / "out") == _tensors(tmp_path / "hf")
    again = hf_class(family).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, ref)
    assert not list((tmp_path / "out").glob(".*.tmp"))


@pytest.mark.parametrize("wrapper", WRAPPED)
def test_wrapped_language_model_loads_and_saves_alone(wrapper, tmp_path):
    """Kimi K2.5's files (a vision tower beside a DeepSeek-V3 language model, as transformers writes them): moekit
    runs the language model with transformers' logits and tokens, says what it left out, and saves the language
    model alone, which transformers loads as its text family with the same logits; `kimi_k2` alone reads too."""
    hf = hf_tiny_model(wrapper, tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert model.config.family == WRAPPED[wrapper]
    assert "mm_projector, vision_tower: not loaded" in model.load_notes[0]
    ids, mask, ref = _right_padded_logits(hf, model)
    hf.generation_config.eos_token_id = None
    expected = hf.generate(ids[:1, :9], max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert model.generate(ids[:1, :9], 16).tolist() == expected.tolist()

    moekit.save_pretrained(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == WRAPPED[wrapper] and "vision_config" not in saved
    language = {
        k.removeprefix("language_model.").replace(".blocks.", ".layers."): v
        for k, v in _tensors(tmp_path / "hf").items()
        if k.startswith("language_model.")
    }
    assert _tensors(tmp_path / "out") == language
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, ref)
    (tmp_path / "out" / "config.json").write_text(json.dumps({**saved, "model_type": "kimi_k2"}))
    alone = moekit.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(alone(ids, mask), model(ids, mask))


def test_dtype_on_load_and_checkpoint_default(tmp_path):
    hf = hf_tiny_model("qwen3_moe", tmp_path / "hf")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert next(moekit.from_pretrained(tmp_path / "bf16").parameters()).dtype == torch.bfloat16
    assert next(moekit.from_pretrained(tmp_path / "bf16", dtype="float32").parameters()).dtype == torch.float32
    assert next(moekit.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_mtp_layer_is_loaded_or_noted(tmp_path):
    hf_tiny_model("deepseek_v3", tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf")
    assert "multi-token-prediction" in model.load_notes[0] and len(model.mtp) == 0
    # a checkpoint that holds the MTP layer (as DeepSeek-V3's own files do) loads it, and saves it back
    full = moekit.from_config(model.config.__class__(**{**model.config.__dict__, "mtp_layers": 1}))
    full.load_state_dict(model.state_dict(), strict=False)
    moekit.save_pretrained(full, tmp_path / "mtp")
    names = _tensors(tmp_path / "mtp")
    assert "model.layers.4.eh_proj.weight" in names and "model.layers.4.shared_head.head.weight" in names
    loaded = moekit.from_pretrained(tmp_path / "mtp")
    assert len(loaded.mtp) == 1 and "loaded 1" in loaded.load_notes[0]
    assert torch.equal(loaded.mtp[0].eh_proj.weight, full.mtp[0].eh_proj.weight)


def test_loading_costs_the_model_size_once(tmp_path):
    """Peak resident memory while loading grows by about the model's own size (files are read tensor by tensor
    straight into the model's memory; no second copy)."""
    directory = tmp_path / "big"
    hf_tiny_model("mixtral", directory, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=1024)
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    grown = loading_growth(directory)
    assert size > 50e6
    assert grown < 1.2 * size, (grown, size)


def _corrupt(directory: Path, how: str) -> None:
    files = sorted(directory.glob("*.safetensors"))
    data = files[0].read_bytes()
    if how == "truncate":
        files[0].write_bytes(data[: len(data) // 2])
    elif how == "header":
        files[0].write_bytes(b"\xff" * 8 + data[8:])
    elif how == "missing_shard":
        files[-1].unlink()


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate", "truncated"),
        ("header", "corrupt or truncated safetensors"),
        ("missing_shard", "is missing"),
    ],
)
def test_damaged_files(tmp_path, damage, message):
    hf_tiny_model("mixtral", tmp_path / "hf")
    _corrupt(tmp_path / "hf", damage)
    with pytest.raises(ValueError, match=message) as e:
        moekit.from_pretrained(tmp_path / "hf")
    assert ".safetensors" in str(e.value) and "\n" not in str(e.value)


def test_bad_directories(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        moekit.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert' is unsupported: allowed one of dbrx, deepseek_v2"):
        moekit.from_pretrained(tmp_path)
    hf_tiny_model("qwen3_moe", tmp_path / "hf")
    os.rename(tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled checkpoints are refused"):
        moekit.from_pretrained(tmp_path / "hf")


def test_wrong_shape_unexpected_and_missing_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_tiny_model("qwen3_moe", tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    good = load_file(file)
    save_file({**good, "model.norm.weight": torch.ones(7)}, file)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \[7\], the config implies \[32\]"):
        moekit.from_pretrained(tmp_path / "hf")
    save_file({**good, "model.extra.weight": torch.ones(3)}, file)
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
        moekit.from_pretrained(tmp_path / "hf")
    save_file({k: v for k, v in good.items() if k != "model.layers.0.mlp.experts.3.up_proj.weight"}, file)
    with pytest.raises(ValueError, match="missing tensors model.layers.0.mlp.experts.gate_up_proj"):
        moekit.from_pretrained(tmp_path / "hf")


def test_generation_cache_equals_recompute_with_left_padding(tmp_path):
    hf_tiny_model("deepseek_v3", tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf")
    ids = torch.randint(3, 96, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    out = model.generate(ids, 6, attention_mask=mask)
    full, full_mask = ids, mask
    for _ in range(6):
        with torch.no_grad():
            nxt = model(full, full_mask)[:, -1].argmax(-1, keepdim=True)
        full, full_mask = torch.cat((full, nxt), 1), torch.cat((full_mask, torch.ones_like(nxt)), 1)
    assert out.tolist() == full.tolist()
    # the padded row continues exactly as the same prompt alone
    alone = model.generate(ids[1:, 3:], 6)
    assert out[1, 7:].tolist() == alone[0, 4:].tolist()


def test_sampling_is_seeded_and_filtered(tmp_path):
    hf_tiny_model("qwen3_moe", tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf")
    ids = torch.randint(3, 96, (1, 5))
    a = model.generate(ids, 8, temperature=0.8, top_p=0.9, seed=1)
    assert torch.equal(a, model.generate(ids, 8, temperature=0.8, top_p=0.9, seed=1))
    top1 = model.generate(ids, 8, temperature=1.0, top_k=1, seed=3)
    assert torch.equal(top1, model.generate(ids, 8))  # top-k 1 is greedy
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, 2, top_p=0.0)
    streamed = []
    model.generate(ids, 4, on_token=lambda t: streamed.append(int(t[0])))
    assert len(streamed) == 4


def _tokenizer(directory: Path, vocab: int = 96):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["[UNK]"], limit_alphabet=40)
    text = Path(json.__file__).read_text().lower()  # a real text every machine has
    tok.train_from_iterator([text], trainer)
    tok.save(str(directory / "tokenizer.json"))
    return tok


def test_generate_command_streams_the_models_greedy_continuation(tmp_path, capsys):
    from moekit.cli.main import main

    hf_tiny_model("qwen3_moe", tmp_path / "hf")
    tok = _tokenizer(tmp_path / "hf")
    assert main(["generate", str(tmp_path / "hf"), "import json", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = moekit.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok.encode("import json").ids])
    assert out["tokens"] == model.generate(ids, 8)[0, ids.shape[1] :].tolist()
    assert (
        main(
            [
                "generate",
                str(tmp_path / "hf"),
                "import json",
                "--max-new-tokens",
                "4",
                "--temperature",
                "0.7",
                "--top-p",
                "0.9",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    streamed = capsys.readouterr()
    assert streamed.out.startswith("import json") and "tok/s" in streamed.err
    args = ["generate", str(tmp_path / "hf"), "import json", "--max-new-tokens", "6", "--json"]
    assert main([*args, "--quantize", "attention=q8,head=q8"]) == 0
    quantized = moekit.from_pretrained(tmp_path / "hf", dtype=torch.float32, quantize="attention=q8,head=q8")
    expected = quantized.generate(ids, 6)[0, ids.shape[1] :].tolist()
    assert json.loads(capsys.readouterr().out)["tokens"] == expected
    assert main(["generate", str(tmp_path / "hf"), "import json", "--speculative"]) == 2
    refused = capsys.readouterr()
    assert refused.out == "" and "mtp_layers=0" in refused.err  # one line, no half-printed prompt
    (tmp_path / "hf" / "tokenizer.json").unlink()
    assert main(["generate", str(tmp_path / "hf"), "x"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
