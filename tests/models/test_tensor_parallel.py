"""Tensor parallelism at the model level on the CPU: two ranks in two threads with in-process
collectives load their shards of the same checkpoint and reproduce the tp=1 model's logits and tokens.
"""

import threading

import pytest
import torch

from blocks.layers.tp import TPInfo
from blocks.models.check import build_tiny_checkpoint, random_prompts
from blocks.models.harness import greedy_generate
from blocks.models.loader import load_model


class ThreadGroup:
    """Sum / concatenate tensors across ``size`` threads (one per rank), in call order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)

    def _exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = x
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return parts

    def info(self, rank: int) -> TPInfo:
        return TPInfo(rank, self.size,
                      all_reduce_fn=lambda x: torch.stack(self._exchange(rank, x)).sum(0),
                      all_gather_fn=lambda x, dim: torch.cat(self._exchange(rank, x), dim))


@pytest.mark.parametrize("family", ["llama3", "llama-linear", "qwen2", "opt"])
def test_two_ranks_reproduce_the_single_rank_model(family, tmp_path):
    build_tiny_checkpoint(family, tmp_path, seed=7)
    prompts = random_prompts((5, 17, 33), seed=7)
    ref = greedy_generate(load_model(tmp_path, attn_backend="torch"), prompts, 8)
    group, results, errors = ThreadGroup(2), [None, None], []

    def run(rank):
        try:
            model = load_model(tmp_path, attn_backend="torch", tp=group.info(rank))
            assert model.num_kv_heads == max(1, model.config.num_kv_heads // 2)
            assert model.lm_head.weight.shape[0] == model.vocab_size // 2  # each rank holds half the vocab
            results[rank] = greedy_generate(model, prompts, 8)
        except BaseException as exc:  # surface a rank's failure in the main thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for res in results:
        assert res.tokens == ref.tokens
        for a, b in zip(res.logits, ref.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
