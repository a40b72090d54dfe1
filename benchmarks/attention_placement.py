"""How the placement of a sequence's KV blocks in the cache changes the paged decode kernel's time (H100).

The attention benchmark shuffles every block id; a freshly started engine hands out blocks mostly in order.
This script keeps the kernel and the shape (8 x 32768, the suite's other settings) and moves only the block
ids: fully shuffled, in order, shuffled inside windows of ``W`` blocks (windows in order), or whole windows
shuffled (order kept inside), and times ours (blocks read in table order, and in physical order: the sorted
walk) and SDPA's contiguous peer with the suite's cold-L2 timer; then the cost of building the walk table::

    PYTHONPATH=. python3 benchmarks/attention_placement.py [--rounds 2] [--batch 8] [--ctx 32768]
"""

from __future__ import annotations

import argparse
import random

import torch

import benchmarks.attention_common as common
from benchmarks.cuda_timing import time_cuda
from blocks.attention import reference
from blocks.attention.triton_backend import TritonAttentionBackend
from blocks.attention.triton_paged import physical_walk_table

_shuffle = random.Random.shuffle


def _inside_windows(w: int):
    def shuffle(self, x):
        for i in range(0, len(x), w):
            part = x[i:i + w]
            _shuffle(self, part)
            x[i:i + w] = part
    return shuffle


def _windows(w: int):
    def shuffle(self, x):
        parts = [x[i:i + w] for i in range(0, len(x), w)]
        _shuffle(self, parts)
        x[:] = [b for part in parts for b in part]
    return shuffle


PLACEMENTS = {
    "shuffled (the suite's)": _shuffle,
    "in order": lambda self, x: None,
    "shuffled inside 2 MB windows": _inside_windows(64),
    "2 MB windows shuffled": _windows(64),
    "shuffled inside 256 KB windows": _inside_windows(8),
    "256 KB windows shuffled": _windows(8),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--walk-only", action="store_true", help="only time the walk table")
    args = p.parse_args()
    for _ in range(0 if args.walk_only else args.rounds):
        for name, shuffle in PLACEMENTS.items():
            random.Random.shuffle = shuffle  # _paged_cache shuffles the block ids with random.Random(0)
            try:
                inputs = common.decode_inputs(args.batch, args.ctx)
            finally:
                random.Random.shuffle = _shuffle
            times = {}
            for walk in (False, True):
                backend = TritonAttentionBackend(sorted_walk=walk)
                md = backend.plan(inputs.metadata)
                out = torch.empty_like(inputs.query)

                def attend(backend=backend, md=md, out=out, inputs=inputs):
                    backend.attend(inputs.query, inputs.key_cache, inputs.value_cache, md,
                                   scale=common.HEAD_DIM ** -0.5, out=out)

                attend()  # builds the walk table once (the plan keeps it, as every layer of a step would)
                times[walk] = time_cuda(attend) * 1e6
            print(f"{args.batch}x{args.ctx} {name:32s} ours {times[False]:7.1f} us   sorted walk {times[True]:7.1f} us"
                  f"   SDPA {time_cuda(inputs.sdpa) * 1e6:7.1f} us", flush=True)
            del inputs
    for rows, width in [(1, 2048), (8, 2048), (64, 256), (256, 64), (256, 2048), (256, 8192)]:
        table = torch.randint(1, 1 << 20, (rows, width), device="cuda", dtype=torch.int32)
        lens = torch.full((rows,), width * common.BLOCK_SIZE - 3, device="cuda", dtype=torch.int32)
        assert torch.equal(physical_walk_table(table, lens, common.BLOCK_SIZE),
                           reference.physical_walk_table(table, lens, common.BLOCK_SIZE))
        us = time_cuda(lambda table=table, lens=lens: physical_walk_table(table, lens, common.BLOCK_SIZE)) * 1e6
        ref = time_cuda(lambda table=table, lens=lens: reference.physical_walk_table(table, lens, common.BLOCK_SIZE))
        print(f"walk table [{rows}, {width}]: Triton {us:6.1f} us, torch {ref * 1e6:6.1f} us", flush=True)


if __name__ == "__main__":
    main()
