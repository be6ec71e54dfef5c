"""The `moekit` command: one module per subcommand (moekit/cli/<name>.py: add_parser and run). Parsing and printing
only: the work happens in the rooms."""

from __future__ import annotations

import argparse
import sys

import moekit
from moekit.cli import (
    cache_sim,
    export_gguf,
    generate,
    inspect,
    models,
    place,
    plan,
    probe,
    quantize,
    report,
    serve,
    trace,
    train,
    upcycle,
)

COMMANDS = (probe, plan, inspect, generate, serve, train, upcycle, quantize, export_gguf, report, models, place, trace)
COMMANDS += (cache_sim,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="A toolkit for Mixture-of-Experts language models.")
    parser.add_argument("--version", action="version", version=f"moekit {moekit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        code = args.fn(args)
    except (ValueError, OSError) as e:  # bad input, or a file that cannot be read or written: one line
        print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        code = 2
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():  # --ep under torchrun
        from moekit.distributed.launch import finish

        finish(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
