"""A minimal greedy generation loop over the paged KV cache (a test and CLI tool, not the engine).

``greedy_generate(model, prompts, max_new_tokens)`` runs every prompt through prefill (optionally
in chunks of ``prefill_chunk`` tokens, so prefill chunks and decode rows share a step) and then
decode steps, entirely through the model's attention backend and a cache from
:func:`blocks.cache.kv_tensors.allocate_kv_cache` with ``block_size`` 16. Block ids are drawn from
a shuffled pool with gaps (block 0 is never used), so block tables are non-contiguous. The cache is
pre-filled with random values so reading an unwritten slot shows up as a wrong result.

It returns the generated tokens and the float32 logits of every position that was computed, so a
caller can compare them with a reference forward over ``prompt + generated[:-1]``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from blocks.attention.metadata import plan_attention
from blocks.cache.kv_tensors import allocate_kv_cache, layer_views
from blocks.models.base import CausalLM

__all__ = ["greedy_generate", "GreedyResult"]


@dataclass
class GreedyResult:
    """Output of :func:`greedy_generate`.

    Attributes:
        tokens: per prompt, the ``max_new_tokens`` greedily generated ids.
        logits: per prompt, ``[len(prompt) + max_new_tokens - 1, vocab_size]`` float32: row ``j`` is
            the logits after position ``j`` of ``prompt + tokens`` (the last token is never fed).
        block_tables: per prompt, the physical block ids it used (for inspection).
        num_steps: model forward calls made.
    """

    tokens: list[list[int]]
    logits: list[torch.Tensor]
    block_tables: list[list[int]]
    num_steps: int


@torch.no_grad()
def greedy_generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    block_size: int = 16,
    prefill_chunk: int | None = None,
    seed: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> GreedyResult:
    """Greedy continuation of each prompt through the paged cache.

    Args:
        model: a loaded model (:mod:`blocks.models.base` contract).
        prompts: token id lists, each non-empty.
        max_new_tokens: tokens to generate per prompt (``>= 1``; no stop on EOS).
        block_size: tokens per KV block.
        prefill_chunk: at most this many prompt tokens per sequence per step (``None`` = whole prompt).
        seed: seeds the block-id shuffle and the cache's initial garbage.
        kv_dtype: cache dtype (default: the model's dtype).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
    device, dtype = model.device, kv_dtype or model.dtype
    rng = random.Random(seed)
    blocks_per_seq = [-(-(len(p) + max_new_tokens) // block_size) for p in prompts]
    num_blocks = 2 * sum(blocks_per_seq) + 1  # room for gaps; block 0 reserved
    pool = list(range(1, num_blocks))
    rng.shuffle(pool)
    pool = pool[::2]  # every other id of the shuffled pool: tables are never contiguous runs
    kv = allocate_kv_cache(model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim,
                           dtype=dtype, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    kv.copy_(torch.randn(kv.shape, generator=gen).to(dtype))
    kv_caches = layer_views(kv)

    seqs = [list(p) for p in prompts]
    computed = [0] * len(prompts)  # tokens whose K/V is in the cache
    tables: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    out_tokens: list[list[int]] = [[] for _ in prompts]
    steps = 0
    while any(len(t) < max_new_tokens for t in out_tokens):
        active = [i for i in range(len(prompts)) if len(out_tokens[i]) < max_new_tokens]
        ids, pos, qlens, slens, btabs = [], [], [], [], []
        for i in active:
            remaining = len(seqs[i]) - computed[i]
            n = remaining if prefill_chunk is None else min(remaining, prefill_chunk)
            start = computed[i]
            ids.extend(seqs[i][start : start + n])
            pos.extend(range(start, start + n))
            while len(tables[i]) * block_size < start + n:
                tables[i].append(pool.pop())
            qlens.append(n)
            slens.append(start + n)
            btabs.append(tables[i])
        metadata = plan_attention(qlens, slens, btabs, block_size, device=device)
        metadata = model.attn_backend.plan(metadata)
        hidden = model(torch.tensor(ids, dtype=torch.int64, device=device),
                       torch.tensor(pos, dtype=torch.int64, device=device), kv_caches, metadata)
        step_logits = model.compute_logits(hidden).cpu()
        offset = 0
        for i, n in zip(active, qlens):
            rows = step_logits[offset : offset + n]
            offset += n
            computed[i] += n
            logits[i].append(rows)
            if computed[i] == len(seqs[i]):  # the last known token was fed: sample the next one
                token = int(rows[-1].argmax())
                out_tokens[i].append(token)
                seqs[i].append(token)
        steps += 1
    return GreedyResult(
        tokens=out_tokens,
        logits=[torch.cat(rows)[: len(p) + max_new_tokens - 1] for rows, p in zip(logits, prompts)],
        block_tables=tables,
        num_steps=steps,
    )
