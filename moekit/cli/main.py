"""The `moekit` command. Parsing and printing only: the work happens in the rooms."""

from __future__ import annotations

import argparse
import json
import sys
import time

import moekit


def _probe(args: argparse.Namespace) -> int:
    import torch

    from moekit.config.scaled import scaled_down
    from moekit.model.probe import probe_routing
    from moekit.train.data import is_validation, read_texts, stdlib_files, token_batches

    torch.manual_seed(args.seed)
    cfg = scaled_down(args.model, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads)
    model = moekit.from_config(cfg)
    if args.backend:
        model.set_backend(args.backend)
    if args.data:
        from pathlib import Path

        path = Path(args.data)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    else:
        files = [f for f in stdlib_files() if not is_validation(f)]
    text = read_texts(files, args.batch * args.seq_len * 2)
    report = probe_routing(model, token_batches(text, args.batch, args.seq_len))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    p = report["params"]
    print(f"model    {report['model']}")
    print(f"routing  {report['routing']}")
    print(f"params   {p['total'] / 1e6:.2f}M total, {p['active'] / 1e6:.2f}M active per token")
    print(
        f"text     {report['tokens']} byte tokens of {'the Python standard library' if not args.data else args.data}"
        f" ({report['tokens_per_s']:.0f} tokens/s, loss {report['loss']:.3f} at random init)"
    )
    print(
        f"\n{'layer':>5} {'min':>6} {'mean':>7} {'max':>6} {'MaxVio':>7} {'entropy':>8} {'CV':>6} {'dead':>5}"
        f" {'dropped':>8}"
    )
    for layer, s in report["layers"].items():
        t = s["tokens_per_expert"]
        print(
            f"{layer:>5} {min(t):>6} {sum(t) / len(t):>7.1f} {max(t):>6} {s['max_vio']:>7.3f} {s['entropy']:>8.3f}"
            f" {s['cv']:>6.3f} {s['dead_experts']:>5} {s['dropped_fraction']:>8.2%}"
        )
    return 0


def _models(args: argparse.Namespace) -> int:
    from moekit.config.published import load_hf_config, published_names
    from moekit.families import moe_from_hf

    rows = []
    for name in published_names():
        moe, layers, _ = moe_from_hf(load_hf_config(name))
        rows.append(
            {"name": name, "moe_layers": len(layers), "routing": moe.describe(), "experts": moe.layout.describe()}
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<24} {r['moe_layers']:>3} MoE layers  {r['routing']}; experts {r['experts']}")
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _count(n: float) -> str:
    """A parameter count in the unit that shows it: 1.234B, 5.67M, 890K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 100 * scale else f"{n / scale:,.0f}{unit}"
    return str(int(n))


def _plan(args: argparse.Namespace) -> int:
    from moekit.plan import plan

    r = plan(
        args.model,
        hardware=args.hardware,
        gpus=args.gpus,
        weights=args.weights,
        kv=args.kv,
        context=args.context,
        concurrency=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        gpu_hour_usd=args.gpu_hour_usd,
        utilisation=args.utilisation,
        api_usd_per_mtok=args.api_usd_per_mtok,
        bandwidth_efficiency=args.bandwidth_efficiency,
        compute_efficiency=args.compute_efficiency,
        reserve=args.reserve,
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    m, p, g, dec, pre, c = r["model"], r["params"], r["gpus"], r["decode"], r["prefill"], r["cost"]
    rows = [
        (
            "model",
            f"{m['name']} ({m['family']}): {m['layers']} layers, {m['moe_layers']} MoE, {m['experts']} experts "
            f"top-{m['top_k']}" + (f" + {m['shared_experts']} shared" if m["shared_experts"] else ""),
        ),
        ("attention", m["attention"]),
        (
            "params",
            f"{p['total'] / 1e9:.2f}B total, {p['active'] / 1e9:.2f}B active "
            f"({p['active_without_embeddings'] / 1e9:.2f}B without embedding and head)",
        ),
        ("weights", f"{r['weights']['precision']}: {_gb(r['weights']['bytes']['total'])}"),
        (
            "KV cache",
            f"{r['kv_cache']['bytes_per_token']:,} bytes/token at {r['kv_cache']['precision']}; "
            f"{_gb(r['kv_cache']['bytes_total'])} for {r['kv_cache']['concurrency']} x "
            f"{r['kv_cache']['context']} tokens",
        ),
        (
            "GPUs",
            f"{g['count']} x {g['hardware']} on {g['nodes']} node(s), {r['memory']['used_fraction']:.0%} of "
            f"usable memory; {g['parallelism']}",
        ),
        (
            "decode",
            f"{dec['tokens_per_s_per_sequence']:.1f} tok/s per sequence, {dec['aggregate_tokens_per_s']:.1f} "
            f"tok/s aggregate ({dec['bound']}-bound; ceiling {dec['ceiling_tokens_per_s_per_sequence']:.1f})",
        ),
        (
            "prefill",
            f"{pre['prompt_tokens']} tokens in {pre['time_to_first_token_s']:.2f} s "
            f"({pre['tokens_per_s']:,.0f} tok/s, {pre['bound']}-bound)",
        ),
    ]
    if c.get("gpu_hour_usd") is not None:
        rows.append(
            (
                "cost",
                f"${c['usd_per_mtok_output']:.3f} per M output tokens, ${c['usd_per_mtok_input']:.3f} "
                f"per M input; ${c['monthly_usd']:,.0f}/month for {c['capacity_mtok_per_month']:,.0f}M tokens",
            )
        )
        if "break_even_mtok_per_month" in c:
            rows.append(
                (
                    "vs API",
                    f"break-even at {c['break_even_mtok_per_month']:,.0f}M tokens/month "
                    f"(API ${c['api_usd_per_mtok']:g}/M)",
                )
            )
    rows.append(("profile", c["profile"]))
    for label, text in rows:
        print(f"{label:<10} {text}")
    if "recommendation" in r:
        print(f"\nrecommended: {g['count']} x {g['hardware']} ({r['recommendation']['why']}); next best:")
        for alt in r["recommendation"]["alternatives"]:
            print(
                f"  {alt['gpus']:>3} x {alt['hardware']:<10} {alt['tokens_per_s_per_sequence']:>7.1f} tok/s/seq  "
                f"${alt['usd_per_mtok_output']:.3f}/M out"
            )
    print("\nhow:")
    for line in r["explain"] + [f"assumed: {a}" for a in r["model"]["assumptions"]]:
        print(f"  - {line}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from moekit.checkpoint.files import checkpoint_dir
    from moekit.infer.speculative import SpeculationStats
    from moekit.infer.tokenizers import StreamDecoder, load_tokenizer

    path = checkpoint_dir(args.checkpoint)
    model = moekit.from_pretrained(path, dtype=torch.float32)
    tokenizer = load_tokenizer(path, model.config.vocab_size)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("prompt='' is invalid: allowed a prompt of at least one token")
    stream = StreamDecoder(tokenizer)
    pending = [] if args.json else [args.prompt]  # the prompt is echoed with the first token, not before an error

    def show(token_B: torch.Tensor) -> None:
        text = stream.push(int(token_B[0]))
        if not args.json:
            print(*pending, text, sep="", end="", flush=True)
            pending.clear()

    stats = SpeculationStats() if args.speculative else None
    start = time.perf_counter()
    out = model.generate(
        torch.tensor([ids]),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        on_token=show,
        speculative=args.speculative,
        stats=stats,
    )
    seconds = time.perf_counter() - start
    new = out[0, len(ids) :].tolist()
    result = {"prompt": args.prompt, "text": tokenizer.decode(new), "tokens": new, "seconds": seconds}
    if stats is not None:
        result["speculation"] = stats.as_dict()
    if args.json:
        print(json.dumps(result))
        return 0
    print(*pending, sep="", end="")
    summary = f"{len(new)} tokens in {seconds:.2f} s, {len(new) / max(seconds, 1e-9):.1f} tok/s"
    if stats is not None:
        depths = zip(stats.accepted_by_depth, stats.checked_by_depth, strict=True)
        summary += (
            f"; MTP drafts accepted {stats.acceptance_rate:.0%} (by depth {', '.join(f'{a}/{c}' for a, c in depths)}),"
            f" {stats.tokens_per_round:.2f} tokens per pass of the model"
        )
    print(f"\n[{summary}]", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from datetime import datetime

    from moekit.train.config import load_run_config
    from moekit.train.trainer import Trainer

    flags = {
        "steps": args.steps,
        "seed": args.seed,
        "data": args.data,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "dtype": args.dtype,
        "tokenizer": args.tokenizer,
        "vocab_size": args.vocab_size,
        "eval_every": args.eval_every,
        "save_every": args.save_every,
        "keep_last": args.keep_last,
        "mtp_weight": args.mtp_weight,
        "tensorboard": args.tensorboard or None,
    }
    model_cfg, train_cfg = load_run_config(args.config, args.preset, flags)
    init = None
    if args.init:
        init = moekit.from_pretrained(args.init, dtype="float32")
        model_cfg = init.config
    if args.resume is not None and not args.out:
        raise ValueError("--resume needs --out RUN_DIR, the run to continue")
    out = args.out or f"runs/{model_cfg.name.removeprefix('moekit-') or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"
    trainer = Trainer(model_cfg, train_cfg, out, init=init, progress=not args.json)
    trainer.start(args.resume if args.resume is not None else False)
    if not args.json:
        from moekit.model.count import count_parameters

        cfg, n = trainer.model_cfg, count_parameters(trainer.model)
        print(f"model    {cfg.name}: {n['total'] / 1e6:.2f}M parameters, {n['active'] / 1e6:.2f}M active per token")
        print(f"routing  {cfg.moe.describe() if cfg.moe else 'dense'}")
        print(f"data     {trainer.data_name} ({trainer.train_stream.ids_N.numel():,} training tokens)")
        print(f"run      {out} (from step {trainer.step} to {train_cfg.steps})", flush=True)
    summary = trainer.run()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"loss     {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} (validation {summary['val_loss']:.3f}, "
        f"MaxVio_global {summary['max_vio_global']:.3f})"
        if summary["first_loss"] is not None
        else f"validation loss {summary['val_loss']:.3f}"
    )
    print(f"speed    {summary['tokens_per_s']:,.0f} tokens/s over {summary['seconds']:.0f} s")
    print(f"final    {summary['final']}")
    print(f'next     moekit generate {out} "def " ; moekit report {out}')
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    from moekit.model.count import count_parameters
    from moekit.train.upcycle import upcycle

    dense = moekit.from_pretrained(args.dense, dtype="float32")
    model = upcycle(
        dense,
        args.experts,
        args.top_k,
        args.granularity,
        drop_ratio=args.drop_ratio,
        seed=args.seed,
        bias_update_rate=args.bias_update_rate,
        aux_loss_coef=args.aux_loss_coef,
    )
    moekit.save_pretrained(model, args.out)
    n_dense, n = count_parameters(dense), count_parameters(model)
    report = {
        "out": args.out,
        "routing": model.config.moe.describe(),
        "moe_layers": list(model.config.moe_layers),
        "dense_params": n_dense["total"],
        "total_params": n["total"],
        "active_params": n["active"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"routing  {report['routing']} in layers {report['moe_layers']}")
        total, active = n["total"] / 1e6, n["active"] / 1e6
        print(f"params   {n_dense['total'] / 1e6:.2f}M dense -> {total:.2f}M total, {active:.2f}M active")
        print(f"wrote    {args.out}   (continue with: moekit train --init {args.out} --out RUN)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from moekit.train.report import render_report

    summary = render_report(args.run_dir, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"steps    {summary['steps']}: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
    if "val_loss" in summary:
        print(f"val      {summary['val_loss']:.3f} (best {summary['best_val_loss']:.3f})")
        print(f"MaxVio   batch {summary['max_vio_last']:.3f}, global {summary['max_vio_global']:.3f}")
        for layer, s in summary["layers"].items():
            print(
                f"layer {layer:>2} MaxVio {s['max_vio']:.3f}, entropy {s['entropy']:.3f}, "
                f"{s['dead_experts']} dead expert(s)"
            )
    for f in summary["files"]:
        print(f"wrote    {f}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from moekit.model.count import PARTS
    from moekit.plan.inspect import inspect_model

    r = inspect_model(args.model)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    p = r["params"]
    dense = f", dense layers {r['dense_layers']}" if r["dense_layers"] else ""
    rows = [
        ("model", f"{r['name']} ({r['family']})"),
        (
            "layers",
            f"{r['layers']} ({len(r['moe_layers'])} MoE{dense}), D={r['hidden_size']}, vocab {r['vocab_size']}"
            + (f", {r['mtp_layers']} multi-token-prediction layer(s)" if r["mtp_layers"] else ""),
        ),
        ("experts", f"{r['experts']} routed, top-{r['top_k']}, {r['shared_experts']} shared; {r['experts_layout']}"),
        ("routing", r["routing"]),
        ("attention", f"{r['attention']}; {r['heads']['query']} query / {r['heads']['key_value']} KV heads"),
        (
            "params",
            f"{p['total']:,} total, {p['active']:,} active "
            f"({p['active_without_embeddings']:,} without embedding and head)",
        ),
        (
            "parts",
            ", ".join(f"{k} {_count(p[k])}" for k in PARTS if p[k]) + (f", mtp {_count(p['mtp'])}" if p["mtp"] else ""),
        ),
        ("bytes", ", ".join(f"{k} {_gb(r['weight_bytes'][k])}" for k in ("fp32", "bf16", "fp8", "mxfp4", "q4_k_m"))),
        ("KV cache", f"{r['kv_cache_bytes_per_token_bf16']:,} bytes per token (bf16)"),
    ]
    for label, text in rows + [("assumed", a) for a in r["assumptions"]]:
        print(f"{label:<10} {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moekit.experts.backends import BACKENDS

    parser = argparse.ArgumentParser(prog="moekit", description="A toolkit for Mixture-of-Experts language models.")
    parser.add_argument("--version", action="version", version=f"moekit {moekit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "probe",
        help="run real text through a scaled-down published MoE and print per-layer routing",
        description="Build a scaled-down copy of a published MoE (its routing, experts and layer pattern, "
        "small widths), run byte tokens of real text through it, and print each MoE layer's expert load.",
    )
    p.add_argument(
        "--model", default="deepseek-v3", help="published config name or config.json path (default: deepseek-v3)"
    )
    p.add_argument("--hidden", type=int, default=256, help="model width D (default 256)")
    p.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--batch", type=int, default=8, help="sequences (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--data", help="a text file or directory (default: the Python standard library's source)")
    p.add_argument("--backend", choices=sorted(BACKENDS), help="experts backend (default: the fast one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(fn=_probe)

    pl = sub.add_parser(
        "plan",
        help="memory, GPUs, decode/prefill speed and cost of serving an MoE",
        description="Plan a deployment from a model's config: parameters, weight and KV-cache memory, GPUs and "
        "parallelism, roofline decode and prefill speed, $ per million tokens and break-even against an API.",
    )
    pl.add_argument("model", help="published name (see `moekit models`), config.json path or model directory")
    pl.add_argument("--hardware", help="GPU kind from the catalog or a JSON/TOML spec file (default: recommend)")
    pl.add_argument("--gpus", type=int, help="GPU count (default: the fewest that fit)")
    pl.add_argument(
        "--weights",
        default="bf16",
        help="PREC or experts=PREC,rest=PREC (bf16, fp8, int8, int4, mxfp4, q8_0, q4_k_m, q4_0, ...; default bf16)",
    )
    pl.add_argument("--kv", default="bf16", help="KV-cache precision (default bf16)")
    pl.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    pl.add_argument("--concurrency", type=int, default=1, help="sequences decoded together (default 1)")
    pl.add_argument("--prompt-tokens", type=int, help="prompt length for time to first token (default: context)")
    pl.add_argument("--gpu-hour-usd", type=float, help="price per GPU-hour (default: the catalog's typical price)")
    pl.add_argument("--utilisation", type=float, default=0.5, help="fraction of time serving (default 0.5)")
    pl.add_argument("--api-usd-per-mtok", type=float, help="an API's price per million tokens, for break-even")
    pl.add_argument("--bandwidth-efficiency", type=float, default=0.7, help="fraction of peak bandwidth (0.7)")
    pl.add_argument("--compute-efficiency", type=float, default=0.5, help="fraction of peak FLOPs (0.5)")
    pl.add_argument("--reserve", type=float, default=0.1, help="memory fraction kept for runtime (0.1)")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(fn=_plan)

    ins = sub.add_parser(
        "inspect",
        help="what a model is: layers, routing, attention, parameters, bytes, KV cache",
        description="Describe a model from its config: family, which layers are MoE, experts and top-k, the routing "
        "spec in words, attention type, total and active parameters, bytes per dtype, KV-cache bytes per token.",
    )
    ins.add_argument("model", help="published name, config.json path or model directory")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(fn=_inspect)

    g = sub.add_parser(
        "generate",
        help="continue a prompt with a model directory, streaming the text",
        description="Load a Hugging Face model directory (or a moekit checkpoint) and continue PROMPT with a KV "
        "cache: greedy by default, or sampled with --temperature / --top-k / --top-p.",
    )
    g.add_argument("checkpoint", help="model directory (config.json, *.safetensors, tokenizer.json)")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, help="sampling seed")
    g.add_argument(
        "--speculative",
        action="store_true",
        help="self-speculative decoding: the model's multi-token-prediction layers draft, one pass checks the "
        "drafts (same output distribution); reports the acceptance rate",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.set_defaults(fn=_generate)

    t = sub.add_parser(
        "train",
        help="train an MoE language model (default: a tiny DeepSeek-V3-style MoE on the standard library)",
        description="Train an MoE LM. With no arguments: the 'tiny' preset (MLA, 16 fine-grained experts top-4 plus "
        "a shared one, auxiliary-loss-free balancing) on the Python standard library's source, a few minutes on 2 "
        "CPU cores. Writes OUT/metrics.jsonl, atomic checkpoints under OUT/checkpoints/ and the final model as a "
        "Hugging Face directory OUT/final/.",
    )
    t.add_argument("--config", help="TOML or YAML file with [model] and [train] tables (over the preset)")
    t.add_argument("--preset", help="tiny (default), small or base")
    t.add_argument("--data", help="a text file or directory (default: the Python standard library's source)")
    t.add_argument("--out", help="run directory (default: runs/PRESET-DATE-TIME)")
    t.add_argument("--steps", type=int, help="optimizer steps (tiny: 300)")
    t.add_argument("--seed", type=int)
    t.add_argument("--batch-size", type=int, help="sequences per micro-batch (tiny: 16)")
    t.add_argument("--seq-len", type=int, help="tokens per sequence (tiny: 128)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (1)")
    t.add_argument("--lr", type=float, help="peak learning rate (tiny: 3e-3)")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], help="float32 (default) or bfloat16 autocast")
    t.add_argument("--tokenizer", choices=["byte", "bpe"], help="byte (default) or a BPE trained on the data")
    t.add_argument("--vocab-size", type=int, help="BPE vocabulary (1024)")
    t.add_argument("--eval-every", type=int, help="steps between validations (50)")
    t.add_argument("--save-every", type=int, help="steps between checkpoints (100)")
    t.add_argument("--keep-last", type=int, help="checkpoints kept (2)")
    t.add_argument("--mtp-weight", type=float, help="multi-token-prediction loss weight (needs mtp_layers)")
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        help="continue the run in --out from its latest checkpoint (or from the checkpoint directory given)",
    )
    t.add_argument("--init", help="start from this model directory (e.g. made by `moekit upcycle`)")
    t.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    t.add_argument("--json", action="store_true", help="no progress bar; print the summary as JSON")
    t.set_defaults(fn=_train)

    u = sub.add_parser(
        "upcycle",
        help="turn a dense checkpoint into an MoE that starts out computing exactly the same",
        description="Sparse upcycling: each dense FFN becomes EXPERTS experts copied from it (with --granularity G, "
        "G slices of it, routed as whole copies and scaled by G), so the MoE reproduces the dense model at "
        "initialisation; --drop-ratio re-initialises part of each expert (drop-upcycling).",
    )
    u.add_argument("dense", help="dense model directory (config.json + safetensors), e.g. RUN/final")
    u.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    u.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    u.add_argument("--granularity", type=int, default=1, help="slices per dense FFN (default 1: whole copies)")
    u.add_argument("--drop-ratio", type=float, default=0.0, help="drop-upcycling ratio (default 0: exact)")
    u.add_argument("--bias-update-rate", type=float, default=0.0, help="loss-free balancing rate u (default 0)")
    u.add_argument("--aux-loss-coef", type=float, default=0.0, help="Switch aux loss alpha (default 0)")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--out", required=True, help="where to write the MoE model directory")
    u.add_argument("--json", action="store_true")
    u.set_defaults(fn=_upcycle)

    r = sub.add_parser(
        "report",
        help="plots and a JSON summary of a training run",
        description="Render a training run's loss curves, per-layer expert-load heatmaps over time and expert "
        "co-activation to PNG (matplotlib), plus summary.json.",
    )
    r.add_argument("run_dir", help="the --out directory of `moekit train`")
    r.add_argument("--out", help="where to write (default RUN_DIR/report)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(fn=_report)

    m = sub.add_parser("models", help="list the published MoE configs moekit ships, with their routing")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:  # bad input, or a file that cannot be read or written: one line
        print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
