"""`moekit generate`: continue a prompt with a model directory, streaming the text."""

from __future__ import annotations

import argparse
import json
import sys
import time

from moekit.cli.loading import add_loading_arguments, load_model


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.checkpoint.files import checkpoint_dir
    from moekit.infer.speculative import SpeculationStats
    from moekit.infer.tokenizers import StreamDecoder, load_tokenizer
    from moekit.kernels import load_kernel

    path = checkpoint_dir(args.checkpoint)
    main = True
    if args.ep > 1:  # every rank decodes the same sequence, each holding 1/N of the experts
        import torch.distributed as dist

        from moekit.distributed.launch import init_from_env

        init_from_env(args.ep, args.dist_timeout, "generate")
        main = dist.get_rank() == 0
    if args.expert_memory and args.ep > 1:
        raise ValueError("--expert-memory with --ep: allowed one or the other (each rank would read its own experts)")
    model = load_model(path, args)
    cache = getattr(model, "expert_cache", None)
    if args.ep > 1:
        from moekit.distributed.expert_parallel import parallelize_experts

        parallelize_experts(model)
    load_kernel()  # a first build says so and happens here, outside the speed reported below
    tokenizer = load_tokenizer(path, model.config.vocab_size)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("prompt='' is invalid: allowed a prompt of at least one token")
    stream = StreamDecoder(tokenizer)
    pending = [] if args.json else [args.prompt]  # the prompt is echoed with the first token, not before an error

    def show(token_B: torch.Tensor) -> None:
        text = stream.push(int(token_B[0]))
        if args.stats:  # the live meter, on stderr (stdout keeps the text)
            meter()
        if not args.json and main:
            print(*pending, text, sep="", end="", flush=True)
            pending.clear()

    shown = {"tokens": 0, "at": time.perf_counter()}

    def meter() -> None:
        """A line on stderr at most every second: what the expert cache did so far, the speed."""
        shown["tokens"] += 1
        now = time.perf_counter()
        if now - shown["at"] >= 1.0 and main:
            shown["at"] = now
            seconds = now - start
            line = (
                cache.stats.line(seconds, shown["tokens"])
                if cache is not None
                else f"{shown['tokens'] / seconds:.2f} tok/s"
            )
            print(f"\n[{line}]", file=sys.stderr, flush=True)

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
    if cache is not None:
        cache.drain()
        result["expert_cache"] = {"slots": cache.slots, "policy": cache.policy, **cache.stats.summary()}
        if args.stats and not args.json and main:
            print(f"\n[{cache.stats.line(seconds, len(out[0]) - len(ids))}]", end="", file=sys.stderr)
    if stats is not None:
        result["speculation"] = stats.as_dict()
    if not main:
        return 0
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


def add_parser(sub) -> None:
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
    add_loading_arguments(g)
    g.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert parallelism over N processes started by torchrun (torchrun --nproc-per-node N -m moekit "
        "generate DIR PROMPT --ep N): each holds 1/N of the experts; rank 0 prints",
    )
    g.add_argument("--dist-timeout", type=float, default=60.0, help="seconds a rank waits for the others (60)")
    g.add_argument(
        "--stats",
        action="store_true",
        help="a live meter on stderr: tok/s and, with --expert-memory, bytes read per token, hit rate, prefetch "
        "precision",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.set_defaults(fn=run)
