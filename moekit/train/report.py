"""`moekit report RUN_DIR`: a training run's loss curves, expert-load heatmaps per layer over time and expert
co-activation as PNG files, and a JSON summary, from RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from moekit.train.trainer import METRICS


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training step records, validation records) of a run."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {METRICS} (not a moekit training run directory)")
    steps, vals = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
        (vals if "val_loss" in record else steps).append(record)
    if not steps:
        raise ValueError(f"{path}: no training steps logged yet")
    return steps, vals


def summarize(steps: list[dict], vals: list[dict]) -> dict:
    last_val = vals[-1] if vals else None
    summary = {
        "steps": steps[-1]["step"],
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "max_vio_first": steps[0]["max_vio"],
        "max_vio_last": steps[-1]["max_vio"],
    }
    if last_val:
        summary.update(
            val_loss=last_val["val_loss"],
            best_val_loss=min(v["val_loss"] for v in vals),
            max_vio_global=last_val["max_vio_global"],
            layers={
                layer: {k: s[k] for k in ("max_vio", "entropy", "dead_experts")}
                for layer, s in last_val["layers"].items()
            },
        )
    return summary


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write loss.png, expert_load.png, coactivation.png (with a validation) and summary.json; returns the summary
    with the written file paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    steps, vals = read_metrics(run_dir)
    summary = summarize(steps, vals)
    files = []

    fig, (ax_loss, ax_vio) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["step"] for r in steps]
    loss = [r["loss"] for r in steps]
    ax_loss.plot(x, loss, alpha=0.3, color="C0", label="train (per step)")
    ax_loss.plot(x, _smooth(loss, max(1, len(loss) // 30)), color="C0", label="train (smoothed)")
    if vals:
        ax_loss.plot([v["step"] for v in vals], [v["val_loss"] for v in vals], "o-", color="C1", label="validation")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax_loss.legend()
    ax_vio.plot(x, _smooth([r["max_vio"] for r in steps], max(1, len(steps) // 30)), label="MaxVio (batch)")
    if vals:
        ax_vio.plot([v["step"] for v in vals], [v["max_vio_global"] for v in vals], "o-", label="MaxVio (global)")
    ax_vio.set(xlabel="step", ylabel="max load / mean load - 1", title="load imbalance (mean over MoE layers)")
    ax_vio.legend()
    fig.tight_layout()
    files.append(_save(fig, out / "loss.png"))

    layers = sorted(steps[-1].get("layers", {}), key=int)
    if layers:
        fig, axes = plt.subplots(len(layers), 1, figsize=(11, 2.2 * len(layers) + 0.6), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers, strict=True):
            rows = [r for r in steps if layer in r.get("layers", {})]
            loads = [r["layers"][layer]["tokens_per_expert"] for r in rows]
            relative = [[c / (sum(load) / len(load)) if sum(load) else 0.0 for c in load] for load in loads]
            columns = list(map(list, zip(*relative, strict=True)))  # experts x steps
            image = ax.imshow(
                columns,
                aspect="auto",
                cmap="viridis",
                vmin=0,
                vmax=3,
                interpolation="nearest",
                extent=(rows[0]["step"] - 0.5, rows[-1]["step"] + 0.5, len(columns) - 0.5, -0.5),
            )
            ax.set(ylabel=f"layer {layer}\nexpert")
        axes[-1, 0].set_xlabel("step")
        fig.colorbar(image, ax=axes[:, 0].tolist(), label="load / mean load")
        fig.suptitle("tokens per expert over training")
        files.append(_save(fig, out / "expert_load.png"))

    if vals and any("coactivation" in s for s in vals[-1]["layers"].values()):
        shown = [layer for layer in sorted(vals[-1]["layers"], key=int) if "coactivation" in vals[-1]["layers"][layer]]
        fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown) + 0.8, 3.6), squeeze=False)
        for ax, layer in zip(axes[0], shown, strict=True):
            pairs = vals[-1]["layers"][layer]["coactivation"]
            # P(j chosen | i chosen): the row normalised by expert i's own count
            cond = [
                [c / row[i] if row[i] and i != j else 0.0 for j, c in enumerate(row)] for i, row in enumerate(pairs)
            ]
            image = ax.imshow(cond, cmap="magma", vmin=0, vmax=1)
            ax.set(title=f"layer {layer}", xlabel="expert j", ylabel="expert i")
        fig.colorbar(image, ax=axes[0].tolist(), label="P(j | i)")
        fig.suptitle(f"expert co-activation on validation data, step {vals[-1]['step']}")
        files.append(_save(fig, out / "coactivation.png"))

    summary["files"] = [str(f) for f in files] + [str(out / "summary.json")]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
