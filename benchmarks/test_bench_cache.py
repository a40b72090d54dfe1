"""Host-side benchmarks of the paged KV cache (issue 3); CPU only, CI-sized.

Run: ``python3 -m pytest benchmarks/test_bench_cache.py --benchmark-only``. Each benchmark puts its
headline figure and the issue's target in ``benchmark.extra_info``:

- block allocate+free throughput of the pool (blocks/s; target >= 1,000,000/s);
- one scheduler step of ``allocate_slots`` for 256 and 1024 running decode sequences (µs per step;
  target <= 200 µs for 256), prefix caching on, every sequence calling once, blocks filling and getting
  registered as they go;
- the same step as ``blocks/sched`` drives it: only sequences that cross into a new block call (µs);
- prefix lookup of a fully cached 4096-token prompt (µs);
- GPU only (skipped without CUDA): the Triton block copy in GB/s (read + write counted), beside the torch
  backend and a contiguous copy of the same bytes.
"""

from __future__ import annotations

import random

import pytest
import torch

from blocks.cache.block_pool import BlockPool
from blocks.cache.manager import KVCacheManager

ROUND_BLOCKS = 64  # blocks allocated then freed per round
ROUNDS = 200


def _alloc_free_rounds(pool: BlockPool) -> None:
    alloc, free = pool.allocate, pool.free
    for _ in range(ROUNDS):
        ids = alloc(ROUND_BLOCKS)
        free(reversed(ids))


def test_bench_pool_allocate_free_throughput(benchmark):
    pool = BlockPool(4096)
    benchmark(_alloc_free_rounds, pool)
    blocks_per_s = ROUNDS * ROUND_BLOCKS / benchmark.stats.stats.median
    best = ROUNDS * ROUND_BLOCKS / benchmark.stats.stats.min  # the shared CPU makes the median noisy
    benchmark.extra_info.update(blocks_per_s=round(blocks_per_s), blocks_per_s_best=round(best),
                                target_blocks_per_s=1_000_000,
                                note="one allocation + one free of a block counts as one")
    pool.check_invariants()


def _decode_setup(num_seqs: int, *, block_size: int = 16):
    rng = random.Random(num_seqs)
    kv = KVCacheManager(num_seqs * 200, block_size, enable_prefix_caching=True)
    seqs = []
    for i in range(num_seqs):
        tokens = [rng.randrange(32000) for _ in range(rng.randint(16, 1024))]
        rid = f"seq{i}"
        assert kv.allocate_slots(rid, len(tokens), token_ids=tokens) is not None
        seqs.append([rid, tokens, len(tokens)])
    return kv, seqs, rng


def _one_decode_step(kv: KVCacheManager, seqs: list, new_token: int) -> None:
    allocate = kv.allocate_slots
    for s in seqs:
        tokens = s[1]
        tokens.append(new_token)
        if allocate(s[0], 1, num_computed_tokens=s[2], token_ids=tokens) is None:
            raise RuntimeError("pool exhausted")
        s[2] += 1


@pytest.mark.parametrize("num_seqs,target_us", [(256, 200.0), (1024, None)])
def test_bench_allocate_slots_decode_step(benchmark, num_seqs, target_us):
    kv, seqs, rng = _decode_setup(num_seqs)
    benchmark.pedantic(_one_decode_step, args=(kv, seqs, 7), rounds=150, iterations=1, warmup_rounds=5)
    us = benchmark.stats.stats.median * 1e6
    benchmark.extra_info.update(step_us=round(us, 1), us_per_sequence=round(us / num_seqs, 3),
                                target_step_us=target_us)
    kv.check_invariants()


def _one_decode_step_on_demand(kv: KVCacheManager, seqs: list, new_token: int) -> None:
    """What blocks/sched does: call allocate_slots only when the next token needs a new block."""
    allocate, bs = kv.allocate_slots, kv.block_size
    for s in seqs:
        tokens = s[1]
        tokens.append(new_token)
        if s[2] + 1 > s[3] * bs:
            new = allocate(s[0], 1, num_computed_tokens=s[2], token_ids=tokens)
            if new is None:
                raise RuntimeError("pool exhausted")
            s[3] += len(new)
        s[2] += 1


@pytest.mark.parametrize("num_seqs", [256, 1024])
def test_bench_allocate_slots_decode_step_on_demand(benchmark, num_seqs):
    kv, seqs, _ = _decode_setup(num_seqs)
    for s in seqs:
        s.append(len(kv.get_block_table(s[0])))
    benchmark.pedantic(_one_decode_step_on_demand, args=(kv, seqs, 7), rounds=150, iterations=1, warmup_rounds=5)
    us = benchmark.stats.stats.median * 1e6
    benchmark.extra_info.update(step_us=round(us, 1), note="only sequences crossing a block boundary call")
    kv.check_invariants()


class _NoOpManager:
    def allocate_slots(self, request_id, num_new_tokens, *, num_computed_tokens=0, token_ids=(),
                       computed_blocks=(), extra_keys=()):
        return []


def test_bench_decode_step_loop_baseline_256(benchmark):
    """The decode-step benchmark's own loop (token append, bookkeeping) against a no-op manager: subtract it
    from ``test_bench_allocate_slots_decode_step[256]`` to get the manager's share."""
    _, seqs, _ = _decode_setup(256)
    benchmark.pedantic(_one_decode_step, args=(_NoOpManager(), seqs, 7), rounds=150, iterations=1, warmup_rounds=5)
    benchmark.extra_info.update(step_us=round(benchmark.stats.stats.median * 1e6, 1))


def test_bench_prefix_lookup_4096_tokens(benchmark):
    rng = random.Random(4096)
    kv = KVCacheManager(4096, 16, enable_prefix_caching=True)
    prompt = [rng.randrange(32000) for _ in range(4096)]
    kv.allocate_slots("warm", len(prompt), token_ids=prompt)
    counter = iter(range(10**9))

    def lookup():
        return kv.get_computed_blocks(f"q{next(counter)}", prompt)  # a new request each time: full hashing

    blocks, num_computed = benchmark(lookup)
    assert num_computed == 4096 - 16 and len(blocks) == 255
    benchmark.extra_info.update(lookup_us=round(benchmark.stats.stats.median * 1e6, 1), prompt_tokens=4096,
                                blocks=255)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_pairs", [64, 1024])
def test_bench_block_copy_gpu(benchmark, num_pairs):
    """Llama-3-8B-shaped cache (32 layers, 8 KV heads, d=128, bf16, block 16): copy ``num_pairs`` independent
    blocks with the Triton kernel. Beside it, in the same process with the same cold-L2 timer: the torch backend
    (index gather/scatter) and a contiguous device-to-device copy of the same bytes (the ceiling). GB/s counts
    the read and the write."""
    from benchmarks.cuda_timing import time_cuda
    from blocks.cache.block_copy import block_copy

    kv = torch.randn(32, 2, 4096, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    rng = random.Random(num_pairs)
    blocks = rng.sample(range(4096), 2 * num_pairs)
    mapping = torch.tensor(list(zip(blocks[:num_pairs], blocks[num_pairs:])), device="cuda")
    src, dst = mapping[:, 0], mapping[:, 1]
    block_copy(kv, mapping, backend="triton")
    assert torch.equal(kv[:, :, dst], kv[:, :, src])
    nbytes = num_pairs * kv[:, :, 0].numel() * kv.element_size()  # bytes read (= bytes written)
    flat_src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    flat_dst = torch.empty_like(flat_src)
    t_triton = time_cuda(lambda: block_copy(kv, mapping, backend="triton"))
    t_torch = time_cuda(lambda: block_copy(kv, mapping, backend="torch"))
    t_ceiling = time_cuda(lambda: flat_dst.copy_(flat_src))
    benchmark.pedantic(lambda: block_copy(kv, mapping, backend="triton"), rounds=5, iterations=1)
    benchmark.extra_info.update(
        median_us=round(t_triton * 1e6, 1), gb_per_s=round(2 * nbytes / t_triton / 1e9, 1),
        torch_us=round(t_torch * 1e6, 1), torch_gb_per_s=round(2 * nbytes / t_torch / 1e9, 1),
        copy_ceiling_us=round(t_ceiling * 1e6, 1), copy_ceiling_gb_per_s=round(2 * nbytes / t_ceiling / 1e9, 1),
        mb_read=round(nbytes / 2**20, 1))
    print(f"block copy {num_pairs} pairs ({nbytes / 2**20:.0f} MiB read): triton {t_triton * 1e6:.1f} us "
          f"{2 * nbytes / t_triton / 1e9:.0f} GB/s, torch {t_torch * 1e6:.1f} us, contiguous copy "
          f"{t_ceiling * 1e6:.1f} us {2 * nbytes / t_ceiling / 1e9:.0f} GB/s")
