"""Routing and balancing experiments on one small setting: same data (the standard library's source, byte-level),
same token budget, same active parameters, several seeds; mean and spread of validation loss and MaxVio_global.

  balancing    no balancing vs Switch aux loss (alpha sweep) vs the auxiliary-loss-free bias (u sweep)
  granularity  8 experts top-1 vs 16 top-2 vs 32 top-4 vs 64 top-8 at equal total and active parameters, with and
               without a shared expert (one routed slot's width moved into an always-on expert)
  choice       token choice vs expert choice, and the causality leak of expert choice: how much the logits of
               earlier positions move when only the last token of the sequence is changed
  upcycle      upcycled from a dense model trained for half the steps vs an MoE trained from scratch for all
  capacity     capacity factor 1.0 / 1.25 / 2.0 (dropping by position) vs dropless, without a balancer and with the
               Switch aux loss: dropped fraction and loss

    python benchmarks/routing_experiments.py [--experiments balancing ...] [--seeds 3] [--steps 150] [--json F]
    python benchmarks/routing_experiments.py --markdown F | --plot F PNG
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from moekit.config.serialize import model_config_from_dict  # noqa: E402
from moekit.train.config import TrainConfig  # noqa: E402
from moekit.train.trainer import Trainer  # noqa: E402
from moekit.train.upcycle import upcycle  # noqa: E402

D, F_ACTIVE = 96, 192  # model width; routed hidden units active per token (k * F) in every configuration


def model_dict(experts: int = 16, top_k: int = 2, shared: bool = False, **moe) -> dict:
    """A GQA model, first layer dense, then MoE layers whose routed experts hold F_ACTIVE / top_k units each.
    shared=True moves one routed slot into an always-on shared expert of the same width."""
    f = F_ACTIVE // top_k
    routing = dict(num_experts=experts - int(shared), top_k=top_k - int(shared), score_func="sigmoid", normalize=True)
    routing.update(moe.pop("routing", {}))
    return dict(
        hidden_size=D,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=256,
        dense_hidden=F_ACTIVE,
        moe_layers=[1, 2, 3],
        max_position=512,
        moe=dict(routing=routing, expert_hidden=f, num_shared_experts=int(shared), **moe),
    )


def train_run(model: dict, seed: int, steps: int, directory: Path, init=None) -> dict:
    cfg = model_config_from_dict(copy.deepcopy(model))
    train = TrainConfig(
        steps=steps,
        batch_size=8,
        seq_len=128,
        lr=3e-3,
        warmup_steps=10,
        seed=seed,
        eval_every=steps,
        eval_batches=8,
        save_every=steps,
        keep_last=1,
        max_train_bytes=4_000_000,
    )
    trainer = Trainer(cfg, train, directory / f"run-{time.monotonic_ns()}", init=init, progress=False)
    trainer.start()
    summary = trainer.run()
    return {"val_loss": summary["val_loss"], "max_vio_global": summary["max_vio_global"], "trainer": trainer}


def aggregate(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def sweep(configs: dict[str, dict], seeds: int, steps: int, directory: Path, extra=None) -> dict:
    results = {}
    for name, model in configs.items():
        runs = []
        for seed in range(seeds):
            r = train_run(model, seed, steps, directory)
            row = {"val_loss": r["val_loss"], "max_vio_global": r["max_vio_global"]}
            if extra:
                row.update(extra(r["trainer"]))
            runs.append(row)
        results[name] = aggregate(runs)
        print(f"  {name:<28} " + "  ".join(f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in results[name].items()))
    return results


def balancing(seeds, steps, directory):
    configs = {"none": model_dict()}
    for alpha in (1e-4, 1e-3, 1e-2, 1e-1):
        configs[f"aux alpha={alpha:g}"] = model_dict(aux_loss_coef=alpha)
    for u in (1e-4, 1e-3, 1e-2):
        configs[f"loss-free u={u:g}"] = model_dict(routing={"selection_bias": True}, bias_update_rate=u)
    return sweep(configs, seeds, steps, directory)


def granularity(seeds, steps, directory):
    configs = {}
    for e, k in ((8, 1), (16, 2), (32, 4), (64, 8)):
        # top-1 keeps the raw sigmoid score as its weight (Llama 4): renormalised, it would always be 1 and the
        # router would never learn from the loss
        routing = {"selection_bias": True, "normalize": k > 1}
        configs[f"{e} experts top-{k}"] = model_dict(e, k, routing=routing, bias_update_rate=1e-3)
        if k > 1:
            configs[f"{e} experts top-{k}, 1 shared"] = model_dict(
                e, k, shared=True, routing={"selection_bias": True}, bias_update_rate=1e-3
            )
    return sweep(configs, seeds, steps, directory)


@torch.no_grad()
def causality_leak(trainer) -> dict:
    """Largest change of the logits at positions < T-1 when only token T-1 changes (0 for a causal model)."""
    model = trainer.model.eval()
    ids = trainer.val_stream.windows(8, 1)[0]
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    a, b = model(ids)[:, :-1], model(changed)[:, :-1]
    return {"leak": float((a - b).abs().max())}


def choice(seeds, steps, directory):
    configs = {
        "token choice top-2": model_dict(routing={"score_func": "softmax"}),
        "expert choice (cf 1)": model_dict(
            router="expert_choice", routing={"score_func": "softmax", "normalize": False}
        ),
    }
    return sweep(configs, seeds, steps, directory, extra=causality_leak)


def upcycling(seeds, steps, directory):
    results = {}
    scratch, upcycled = [], []
    moe = model_dict(8, 2, routing={"score_func": "softmax"})
    dense = {**model_dict(), "moe": None, "moe_layers": [], "dense_hidden": F_ACTIVE}
    for seed in range(seeds):
        r = train_run(moe, seed, steps, directory)
        scratch.append({"val_loss": r["val_loss"], "max_vio_global": r["max_vio_global"]})
        d = train_run(dense, seed, steps // 2, directory)
        # granularity 2: 4 copies of the dense FFN cut in 2 slices, one copy per token: the scratch MoE's total
        # (8 x F/2) and active (2 x F/2) widths
        model = upcycle(d["trainer"].model, 8, 2, granularity=2, seed=seed)
        u = train_run(_as_dict(model), seed, steps - steps // 2, directory, init=model)
        upcycled.append({"val_loss": u["val_loss"], "max_vio_global": u["max_vio_global"]})
    results[f"scratch ({steps} steps)"] = aggregate(scratch)
    results[f"dense {steps // 2} + upcycled {steps - steps // 2}"] = aggregate(upcycled)
    for name, r in results.items():
        print(f"  {name:<28} " + "  ".join(f"{k} {v['mean']:.4f}±{v['std']:.4f}" for k, v in r.items()))
    return results


def _as_dict(model) -> dict:
    from moekit.config.serialize import config_to_dict

    return config_to_dict(replace(model.config, extra={}))


def capacity(seeds, steps, directory, balanced: tuple[bool, ...] = (False, True)):
    """Without a balancer, and with Switch's aux loss at its published alpha = 1e-2 (Switch pairs the two)."""
    configs = {}
    for aux in balanced:
        extra, name = ({"aux_loss_coef": 1e-2}, "aux 1e-2, ") if aux else ({}, "")
        configs[f"{name}dropless"] = model_dict(**extra)
        for cf in (1.0, 1.25, 2.0):
            configs[f"{name}capacity {cf:g}"] = model_dict(capacity_factor=cf, **extra)

    def dropped(trainer) -> dict:
        lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
        steps_ = [json.loads(x) for x in lines if '"loss"' in x]
        return {"dropped_fraction": statistics.mean(s["dropped_fraction"] for s in steps_)}

    return sweep(configs, seeds, steps, directory, extra=dropped)


EXPERIMENTS = {
    "balancing": balancing,
    "granularity": granularity,
    "choice": choice,
    "upcycle": upcycling,
    "capacity": capacity,
}


def print_markdown(results: dict) -> None:
    r = results
    print(f"{r['machine']}; {r['steps']} steps of {r['tokens_per_step']} tokens, {r['seeds']} seeds")
    for name in EXPERIMENTS:
        if name not in results:
            continue
        rows = results[name]
        keys = list(next(iter(rows.values())))
        print(f"\n**{name}**\n")
        print("| setting | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for setting, r in rows.items():
            print(f"| {setting} | " + " | ".join(f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}" for k in keys) + " |")


def plot(results: dict, path: str) -> None:
    """Validation loss against MaxVio_global, one point per setting with its seed spread (Wang et al.'s Figure),
    one panel per experiment that has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in EXPERIMENTS if n in results]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.remove()
    for ax, name in zip(axes.flat, names, strict=False):
        for setting, r in results[name].items():
            ax.errorbar(
                r["max_vio_global"]["mean"],
                r["val_loss"]["mean"],
                xerr=r["max_vio_global"]["std"],
                yerr=r["val_loss"]["std"],
                fmt="o",
                capsize=3,
                label=setting,
            )
        ax.set(title=name, xlabel="MaxVio_global (lower: more balanced)", ylabel="validation loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*breaks causality.*")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--json")
    p.add_argument("--markdown", help="print the tables of a results JSON written by --json, and stop")
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="plot a results JSON (loss vs MaxVio), and stop")
    args = p.parse_args()
    if args.markdown:
        print_markdown(json.loads(Path(args.markdown).read_text()))
        return
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), args.plot[1])
        return
    out = {"machine": machine(), "steps": args.steps, "seeds": args.seeds, "tokens_per_step": 8 * 128}
    with tempfile.TemporaryDirectory() as d:
        for name in args.experiments:
            print(f"{name}:", flush=True)
            start = time.perf_counter()
            out[name] = EXPERIMENTS[name](args.seeds, args.steps, Path(d))
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
