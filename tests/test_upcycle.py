"""Sparse upcycling: the MoE made from a dense model computes exactly the dense model's output at initialisation
(whole copies, and fine-grained slices routed as copies), drop-upcycling departs from it by design, bad settings
are refused in one line, and training continues from the upcycled directory."""

import json
import subprocess
import sys

import pytest
import torch

import moekit
from moekit import ModelConfig
from moekit.train.upcycle import upcycle

DENSE = ModelConfig(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, moe=None, dense_hidden=48)


def dense_model():
    torch.manual_seed(0)
    return moekit.from_config(DENSE).eval()


@pytest.mark.parametrize(("experts", "top_k", "granularity"), [(4, 2, 1), (8, 1, 1), (8, 4, 2), (12, 6, 3), (6, 3, 3)])
def test_upcycled_model_reproduces_the_dense_one(experts, top_k, granularity):
    dense = dense_model()
    ids = torch.randint(0, 256, (3, 24))
    with torch.no_grad():
        ref = dense(ids)
        out = upcycle(dense, experts, top_k, granularity).eval()(ids)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_drop_upcycling_changes_the_start_and_leaves_the_dense_model_alone():
    dense = dense_model()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = dense(ids)
        out = upcycle(dense, 4, 2, drop_ratio=0.5).eval()(ids)
    assert float((out - ref).abs().max() / ref.abs().max()) > 1e-3
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


def test_bad_upcycling_settings_are_refused():
    dense = dense_model()
    with pytest.raises(ValueError, match="granularity=5 is invalid"):
        upcycle(dense, 10, 5, 5)
    with pytest.raises(ValueError, match="multiples of granularity=2"):
        upcycle(dense, 8, 3, 2)
    with pytest.raises(ValueError, match="top_k=9 is invalid"):
        upcycle(dense, 8, 9)


def test_cli_upcycles_a_saved_dense_model_and_training_continues(tmp_path):
    dense = dense_model()
    moekit.save_pretrained(dense, tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == "moekit"
    out = tmp_path / "moe"
    cmd = [sys.executable, "-m", "moekit", "upcycle", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2"]
    r = subprocess.run([*cmd, "--out", str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["moe_layers"] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"  # transformers loads it
    moe = moekit.from_pretrained(out)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert float((moe(ids) - dense(ids)).abs().max()) < 1e-5

    from moekit.train.config import load_run_config
    from moekit.train.trainer import Trainer

    _, train_cfg = load_run_config(overrides={"steps": 3, "batch_size": 2, "seq_len": 32, "max_train_bytes": 50000})
    trainer = Trainer(moe.config, train_cfg, tmp_path / "run", init=moe, progress=False)
    trainer.start()
    summary = trainer.run()
    assert summary["steps"] == 3 and moekit.from_pretrained(tmp_path / "run" / "final").config.moe.num_experts == 4

    r = subprocess.run(
        [*cmd[:-4], "--experts", "6", "--granularity", "4", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "top_k=2 is invalid" in r.stderr and len(r.stderr.strip().splitlines()) == 1
