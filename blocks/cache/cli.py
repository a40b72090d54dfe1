"""``blocks kv-cache``: size a paged KV cache for a model shape and a memory budget.

Example (Llama-3-8B, bf16, 20 GiB for the cache)::

    blocks kv-cache --num-layers 32 --num-kv-heads 8 --head-dim 128 --dtype bfloat16 --budget-gib 20

prints bytes per token and per block, the number of blocks that fit, the token capacity and how many
requests of ``--max-model-len`` tokens fit at once.
"""

from __future__ import annotations

import argparse
import sys

_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn")


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Configure the ``kv-cache`` subcommand."""
    parser.add_argument("--num-layers", type=int, required=True)
    parser.add_argument("--num-kv-heads", type=int, required=True)
    parser.add_argument("--head-dim", type=int, required=True)
    parser.add_argument("--dtype", choices=_DTYPES, default="bfloat16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--budget-gib", type=float, required=True, help="memory for the KV cache, GiB")
    parser.add_argument("--max-model-len", type=int, default=None, help="report how many such requests fit")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import torch

    from .kv_tensors import bytes_per_block, bytes_per_token, num_blocks_for_budget

    dtype = getattr(torch, args.dtype)
    for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
        if getattr(args, name) <= 0:
            print(f"blocks kv-cache: error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    shape = dict(num_layers=args.num_layers, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim, dtype=dtype)
    per_token = bytes_per_token(**shape)
    per_block = bytes_per_block(block_size=args.block_size, **shape)
    budget = int(args.budget_gib * 2**30)
    try:
        num_blocks = num_blocks_for_budget(budget, block_size=args.block_size, **shape)
    except ValueError as e:
        print(f"blocks kv-cache: error: {e}", file=sys.stderr)
        return 2
    print(f"bytes per token : {per_token:,} ({per_token / 1024:.1f} KiB)")
    print(f"bytes per block : {per_block:,} (block_size={args.block_size})")
    print(f"blocks          : {num_blocks:,} in {budget:,} bytes")
    print(f"token capacity  : {num_blocks * args.block_size:,}")
    if args.max_model_len:
        per_req = -(-args.max_model_len // args.block_size)
        print(f"full-length requests at once (max_model_len={args.max_model_len}): {num_blocks // per_req:,}")
    return 0
