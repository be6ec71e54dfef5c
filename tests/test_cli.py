"""The moekit command, run as a user runs it."""

import json
import subprocess
import sys

import moekit


def _run(*args):
    return subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True, timeout=300)


def test_help_and_version():
    r = _run("--help")
    assert r.returncode == 0 and "probe" in r.stdout and "models" in r.stdout
    r = _run("--version")
    assert r.returncode == 0 and moekit.__version__ in r.stdout
    assert _run("probe", "--help").returncode == 0


def test_probe_json_on_stdlib_text():
    r = _run(
        "probe",
        "--model",
        "mixtral-8x7b",
        "--hidden",
        "64",
        "--layers",
        "2",
        "--batch",
        "2",
        "--seq-len",
        "64",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["tokens"] == 128
    assert set(report["layers"]) == {"0", "1"}
    for s in report["layers"].values():
        assert sum(s["tokens_per_expert"]) == 128 * 2 and len(s["tokens_per_expert"]) == 8
    assert report["params"]["active"] < report["params"]["total"]


def test_probe_table_and_errors(tmp_path):
    r = _run("probe", "--hidden", "64", "--layers", "2", "--batch", "1", "--seq-len", "32")
    assert r.returncode == 0 and "MaxVio" in r.stdout
    r = _run("probe", "--model", "no-such-model")
    assert r.returncode == 2 and "unknown" in r.stderr and "Traceback" not in r.stderr
    small = tmp_path / "tiny.txt"
    small.write_text("hi")
    r = _run("probe", "--data", str(small))
    assert r.returncode == 2 and "at least" in r.stderr and "Traceback" not in r.stderr


def test_models_lists_published_configs():
    r = _run("models", "--json")
    names = {row["name"] for row in json.loads(r.stdout)}
    assert {"deepseek-v3", "mixtral-8x7b", "qwen3-30b-a3b"} <= names
