"""The ``blocks`` command line.

Each subcommand lives next to the block it drives and is registered here by
``"name": "module:function"``; the function takes an ``argparse`` subparser, adds its flags and
sets ``func`` (called with the parsed args, returning an exit code). Modules are imported only
when their subcommand runs, so ``blocks --help`` stays fast and server packages stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from blocks import __version__

# name -> (module:function that configures the subparser, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check-models": ("blocks.models.check:add_parser", "Check every model family against transformers"),
    "simulate": ("blocks.sched.simulate:add_parser", "Simulate the scheduler on a synthetic trace; print a table"),
    "generate": ("blocks.engine.generate_cli:add_parser", "Generate text for one-off prompts"),
    "bench": ("blocks.engine.bench:add_parser", "Benchmark the engine: latency or throughput (like vllm bench)"),
    "kv-cache": ("blocks.cache.cli:add_parser", "Size a paged KV cache for a model shape and a memory budget"),
    "serve": ("serve.cli:add_parser", "Serve a model with an OpenAI-compatible HTTP API (like vllm serve)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blocks", description="A kernel-first LLM inference toolkit.")
    parser.add_argument("--version", action="version", version=f"blocks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    for name, (target, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module of the command being run
            module, func = target.split(":")
            getattr(importlib.import_module(module), func)(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:])
    if extra:
        if not getattr(args, "pass_through", False):  # only pass-through commands take unknown flags
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.serve_args = list(getattr(args, "serve_args", [])) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
