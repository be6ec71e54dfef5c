"""`moekit train`: train an MoE language model."""

from __future__ import annotations

import argparse
import json

import moekit


def run(args: argparse.Namespace) -> int:
    from datetime import datetime

    from moekit.kernels import load_kernel
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
    load_kernel()  # a first build says so and happens here, before the progress bar's clock starts
    init = None
    if args.init:
        init = moekit.from_pretrained(args.init, dtype="float32")
        model_cfg = init.config
    if args.resume is not None and not args.out:
        raise ValueError("--resume needs --out RUN_DIR, the run to continue")
    if args.ep > 1 and not args.out:
        raise ValueError(f"--ep {args.ep} needs --out RUN_DIR: every rank must name the same run")
    out = args.out or f"runs/{model_cfg.name.removeprefix('moekit-') or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"
    parallel = None
    if args.ep > 1:
        from moekit.distributed.launch import init_from_env
        from moekit.distributed.training import ExpertParallelRun

        init_from_env(args.ep, args.dist_timeout, multiple=True)
        parallel = ExpertParallelRun(args.ep)
    trainer = Trainer(model_cfg, train_cfg, out, init=init, progress=not args.json, parallel=parallel)
    trainer.start(args.resume if args.resume is not None else False)
    if not args.json and trainer.parallel.main:
        cfg, n = trainer.model_cfg, trainer.parameter_counts()
        print(f"model    {cfg.name}: {n['total'] / 1e6:.2f}M parameters, {n['active'] / 1e6:.2f}M active per token")
        print(f"routing  {cfg.moe.describe() if cfg.moe else 'dense'}")
        print(f"data     {trainer.data_name} ({trainer.train_stream.ids_N.numel():,} training tokens)")
        print(f"run      {out} (from step {trainer.step} to {train_cfg.steps})", flush=True)
    try:
        summary = trainer.run()
    except RuntimeError as e:  # a collective that timed out or lost a peer (torch's DistBackendError among them)
        if parallel is None:
            raise
        from moekit.distributed.launch import failure_message

        raise ValueError(failure_message(e, args.dist_timeout)) from None
    if not trainer.parallel.main:
        return 0
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


def add_parser(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train an MoE language model (default: a tiny DeepSeek-V3-style MoE on the standard library)",
        description="Train an MoE LM. With no arguments: the 'tiny' preset (MLA, 16 fine-grained experts top-4 plus "
        "a shared one, auxiliary-loss-free balancing) on the Python standard library's source, a few minutes on 2 "
        "CPU cores. Writes OUT/metrics.jsonl, atomic checkpoints under OUT/checkpoints/ and the final model as a "
        "Hugging Face directory OUT/final/.",
    )
    t.add_argument("--config", help="TOML or YAML file with [model] and [train] tables (over the preset)")
    t.add_argument("--preset", help="tiny (default), tiny-hybrid (linear attention, as Qwen3-Next), small or base")
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
    t.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert parallelism over N of the processes torchrun started (torchrun --nproc-per-node P -m moekit "
        "train --ep N --out RUN ...; P a multiple of N, the rest data parallel): each holds 1/N of the experts and "
        "1/P of every batch",
    )
    t.add_argument(
        "--dist-timeout", type=float, default=60.0, help="seconds a rank waits for the others before it stops (60)"
    )
    t.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    t.add_argument("--json", action="store_true", help="no progress bar; print the summary as JSON")
    t.set_defaults(fn=run)
