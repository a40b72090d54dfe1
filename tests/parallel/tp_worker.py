"""Worker for the tensor-parallel tests: one rank of a gloo group runs every family's tiny model
through the paged greedy harness and writes rank 0's results to a file (torch.save)."""

from __future__ import annotations

import os
import sys

import torch


def run_rank(rank: int, world_size: int, port: int, checkpoints: dict, prompts: list, max_new: int, out_path: str):
    from blocks.models.harness import greedy_generate
    from blocks.models.loader import load_model
    from blocks.parallel.state import DistConfig, destroy_tensor_parallel, init_tensor_parallel

    torch.set_num_threads(1)
    tp = init_tensor_parallel(world_size, backend="gloo",
                              config=DistConfig(rank=rank, world_size=world_size, master_port=port))
    results = {}
    for family, path in checkpoints.items():
        model = load_model(path, dtype="float32", device="cpu", attn_backend="torch", tp=tp)
        res = greedy_generate(model, prompts, max_new)
        results[family] = (res.tokens, [t.clone() for t in res.logits])
    if tp.rank == 0:
        torch.save(results, out_path)
    destroy_tensor_parallel()


def main() -> None:  # entry point under torchrun: python -m tests.parallel.tp_worker OUT CKPT...
    out_path, *pairs = sys.argv[1:]
    checkpoints = dict(p.split("=", 1) for p in pairs)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2]]
    run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"]),
             checkpoints, prompts, 6, out_path)


if __name__ == "__main__":
    main()
