"""`moekit train`: the loss falls, metrics and telemetry are written, the final model loads in moekit and in
transformers with the same logits, a resumed run repeats the uninterrupted one exactly (also after a crash in the
middle of a save), and bad input gives one-line errors without touching existing checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moekit
from moekit.train import checkpoint as train_checkpoint
from moekit.train.checkpoint import list_checkpoints, load_checkpoint
from moekit.train.config import load_run_config
from moekit.train.trainer import Trainer

SMALL_TOML = """
[model]
hidden_size = 32
num_heads = 2
num_layers = 3
dense_hidden = 64
moe_layers = [1, 2]
max_position = 128
[model.attention]
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 8
v_head_dim = 8
[model.moe]
expert_hidden = 16
shared_hidden = 16
[model.moe.routing]
num_experts = 8
top_k = 2
n_group = 4
topk_group = 2

[train]
steps = 8
batch_size = 4
seq_len = 32
warmup_steps = 2
eval_every = 4
eval_batches = 2
save_every = 4
max_train_bytes = 100000
max_val_bytes = 20000
"""


def small(tmp_path: Path, extra: str = "", **flags):
    config = tmp_path / "small.toml"
    config.write_text(SMALL_TOML + extra)
    return load_run_config(config, overrides=flags)


def train(tmp_path: Path, name: str, resume=False, until=None, **flags) -> Trainer:
    model_cfg, train_cfg = small(tmp_path, **flags)
    trainer = Trainer(model_cfg, train_cfg, tmp_path / name, progress=False)
    trainer.start(resume)
    trainer.run(until)
    return trainer


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_metrics_checkpoints_and_a_final_model_transformers_loads(tmp_path):
    trainer = train(tmp_path, "run", steps=30, eval_every=10)
    lines = records(tmp_path / "run")
    steps = [r for r in lines if "loss" in r]
    vals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert {"step", "loss", "tokens_per_s", "max_vio", "lr", "grad_norm", "layers"} <= set(steps[0])
    assert set(steps[0]["layers"]) == {"1", "2"} and len(steps[0]["layers"]["1"]["tokens_per_expert"]) == 8
    assert sum(steps[0]["layers"]["1"]["tokens_per_expert"]) == 4 * 32 * 2
    assert [r["step"] for r in vals] == [10, 20, 30]
    coact = torch.tensor(vals[-1]["layers"]["1"]["coactivation"])
    assert torch.equal(coact, coact.T) and torch.equal(
        coact.diagonal(), torch.tensor(vals[-1]["layers"]["1"]["tokens_per_expert"])
    )
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 1.0, (first, last)  # byte-level loss starts near ln(256) = 5.5
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000028", "step-00000030"]
    # the balancer's bias moved (it is saved as DeepSeek-V3's e_score_correction_bias)
    assert any(r.selection_bias_E.abs().sum() > 0 for r in trainer.model.routers())

    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    ours = moekit.from_pretrained(final)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([list(b"def main(argv):\n    return 0\n")])
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4
    greedy = theirs.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=8), greedy)


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    train(tmp_path, "straight")
    part = train(tmp_path, "resumed", until=4)
    assert part.step == 4 and not (tmp_path / "resumed" / "final").exists()
    train(tmp_path, "resumed", resume=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in rs]
    assert strip(records(tmp_path / "resumed")) == strip(records(tmp_path / "straight"))
    a = moekit.from_pretrained(tmp_path / "straight" / "final").state_dict()
    b = moekit.from_pretrained(tmp_path / "resumed" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    train(tmp_path, "straight")
    model_cfg, train_cfg = small(tmp_path)
    trainer = Trainer(model_cfg, train_cfg, tmp_path / "run", progress=False)
    trainer.start()
    real_save = train_checkpoint.save_file
    calls = []

    def dying_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # the second checkpoint: its model file is half written, then the process "dies"
            Path(filename).write_bytes(b"\x00" * 100)
            raise KeyboardInterrupt("killed")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(train_checkpoint, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(train_checkpoint, "save_file", real_save)
    kept = list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000004"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    load_checkpoint(kept[0], Trainer(model_cfg, train_cfg, tmp_path / "x", progress=False).model, None)
    train(tmp_path, "run", resume=True)
    losses = lambda run: [r.get("loss", r.get("val_loss")) for r in records(tmp_path / run)]
    assert losses("run") == losses("straight")


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    """Killed at a moment no one chose (inside a step or a save), the run resumes from its last checkpoint and
    repeats the uninterrupted run's curve exactly."""
    (tmp_path / "small.toml").write_text(SMALL_TOML)
    cmd = [sys.executable, "-m", "moekit", "train", "--config", str(tmp_path / "small.toml"), "--out"]
    cmd += [str(tmp_path / "run"), "--steps", "400", "--save-every", "1", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(tmp_path / "run")) < 3:
        time.sleep(0.05)
    time.sleep(0.137)  # somewhere inside a later step or save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = list_checkpoints(tmp_path / "run")
    assert kept, "no checkpoint was written before the kill"
    model_cfg, train_cfg = small(tmp_path, steps=400, save_every=1)
    state = load_checkpoint(kept[-1], Trainer(model_cfg, train_cfg, tmp_path / "x", progress=False).model, None)
    assert state["step"] == int(kept[-1].name.split("-")[1])
    until = state["step"] + 2
    trainer = train(tmp_path, "run", resume=True, until=until, steps=400, save_every=1)
    assert trainer.step == until
    train(tmp_path, "straight", until=until, steps=400, save_every=1)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs if r["step"] <= until]
    assert strip(records(tmp_path / "run")) == strip(records(tmp_path / "straight"))


def test_bpe_tokenizer_multi_token_prediction_and_generate_cli(tmp_path, capsys):
    model_cfg, train_cfg = small(tmp_path, tokenizer="bpe", vocab_size=320, mtp_weight=0.3)
    model_cfg = replace(model_cfg, mtp_layers=1)
    trainer = Trainer(model_cfg, train_cfg, tmp_path / "run", progress=False)
    trainer.start()
    trainer.run()
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    assert "mtp_loss" in steps[0] and steps[-1]["mtp_loss"] < steps[0]["mtp_loss"]
    final = tmp_path / "run" / "final"
    assert (final / "tokenizer.json").is_file()
    model = moekit.from_pretrained(final)
    assert model.config.vocab_size == 320 and model.config.mtp_layers == 1
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moekit",
            "generate",
            str(tmp_path / "run"),
            "import ",
            "--max-new-tokens",
            "5",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    plain = json.loads(out.stdout)["tokens"]
    assert len(plain) == 5
    # self-speculative decoding with the trained MTP layer: the same greedy tokens, and its acceptance reported
    from moekit.cli.main import main

    assert main(["generate", str(tmp_path / "run"), "import ", "--max-new-tokens", "5", "--speculative", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == plain and 0.0 <= result["speculation"]["acceptance_rate"] <= 1.0
    assert result["speculation"]["rounds"] + sum(result["speculation"]["accepted_by_depth"]) == 4


def test_a_router_no_hf_family_expresses_saves_in_moekit_format(tmp_path):
    model_cfg, train_cfg = small(tmp_path, steps=2)
    spec = moekit.RoutingSpec(num_experts=8, top_k=2)
    moe = replace(model_cfg.moe, routing=spec, router="expert_choice", bias_update_rate=0.0, num_shared_experts=0)
    with pytest.warns(UserWarning, match="causality"):
        trainer = Trainer(replace(model_cfg, moe=moe), train_cfg, tmp_path / "run", progress=False)
    trainer.start()
    trainer.run()
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "moekit"
    loaded = moekit.from_pretrained(final)
    assert loaded.config.moe.router == "expert_choice"
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), trainer.model.eval()(ids))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True)


def test_bad_input_gives_one_line_errors_and_keeps_checkpoints(tmp_path):
    (tmp_path / "small.toml").write_text(SMALL_TOML)
    cfg = ["--config", str(tmp_path / "small.toml")]
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.bin").write_bytes(bytes(range(256)) * 10)
    cases = {
        "holds no readable text": ["train", *cfg, "--data", str(binary), "--out", str(tmp_path / "a")],
        "does not exist": ["train", *cfg, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")],
        "steps=0 is invalid": ["train", *cfg, "--steps", "0", "--out", str(tmp_path / "c")],
        "no checkpoint": ["train", *cfg, "--resume", "--out", str(tmp_path / "d")],
        "preset='huge' is invalid": ["train", "--preset", "huge"],
    }
    for needle, args in cases.items():
        r = run_cli(*args)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, (needle, r.stderr)

    bad = tmp_path / "bad.toml"
    bad.write_text(SMALL_TOML.replace("top_k = 2", "top_k = 9"))
    r = run_cli("train", "--config", str(bad), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "top_k=9 is invalid" in r.stderr
    bad.write_text(SMALL_TOML.replace("steps = 8", "stepz = 8"))
    r = run_cli("train", "--config", str(bad), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "stepz is not a TrainConfig field" in r.stderr

    (tmp_path / "file").write_text("x")
    r = run_cli("train", *cfg, "--out", str(tmp_path / "file" / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1

    train(tmp_path, "run")
    before = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(tmp_path / "run")}
    r = run_cli("train", *cfg, "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "already holds a training run" in r.stderr
    r = run_cli("train", *cfg, "--seq-len", "16", "--resume", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "training settings differ in seq_len" in r.stderr
    other = tmp_path / "other.toml"
    other.write_text(SMALL_TOML.replace("expert_hidden = 16", "expert_hidden = 24"))
    r = run_cli("train", "--config", str(other), "--resume", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "its model differs in moe" in r.stderr
    after = {p.name: (p / "model.safetensors").read_bytes() for p in list_checkpoints(tmp_path / "run")}
    assert after == before


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = train(tmp_path, "run", steps=4)
    kept = list_checkpoints(tmp_path / "run")

    def full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_checkpoint, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save()
    assert list_checkpoints(tmp_path / "run") == kept
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    os.sync()


def test_report_renders_plots_and_a_summary(tmp_path):
    pytest.importorskip("matplotlib")
    train(tmp_path, "run")
    r = run_cli("report", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == 8 and set(summary["layers"]) == {"1", "2"}
    for name in ("loss.png", "expert_load.png", "coactivation.png", "summary.json"):
        path = tmp_path / "run" / "report" / name
        assert path.is_file() and path.stat().st_size > 1000 or name == "summary.json"
    assert (tmp_path / "run" / "report" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    r = run_cli("report", str(tmp_path))
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr


def test_top1_with_renormalised_weights_warns_that_the_router_cannot_learn(tmp_path):
    model_cfg, train_cfg = small(tmp_path, steps=1)
    spec = moekit.RoutingSpec(num_experts=8, top_k=1, normalize=True, selection_bias=True)
    moe = replace(model_cfg.moe, routing=spec)
    with pytest.warns(UserWarning, match="never trains the router"):
        Trainer(replace(model_cfg, moe=moe), train_cfg, tmp_path / "run", progress=False)
