"""Random paged batches for the attention kernel tests (shared by the CPU and GPU tests)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from blocks.attention import reference
from blocks.attention.metadata import AttentionMetadata, plan_attention

FP8 = torch.float8_e4m3fn

# (query_len, seq_len) pairs: decode rows, prefill chunks over a cached prefix, whole prompts
MIXED_PAIRS = [(1, 1), (1, 17), (15, 15), (16, 40), (17, 17), (5, 97), (1, 16), (97, 97), (1, 15)]
DECODE_PAIRS = [(1, 1), (1, 15), (1, 16), (1, 17), (1, 97), (1, 300)]

TOLERANCE = {  # (atol, rtol) against the float32 reference, per query dtype
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclass
class Batch:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    metadata: AttentionMetadata
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


def make_batch(
    pairs, *, num_heads, num_kv_heads, head_dim, block_size, dtype, device="cpu", cache_dtype=None,
    num_blocks=None, pad_tokens=0, pad_rows=0, poison=True,
) -> Batch:
    """A random mixed batch: cached prefixes already in a NaN-poisoned cache, new K/V not yet written.

    Block ids are shuffled; ``pad_rows`` sequences with ``seq_len == 0`` and ``pad_tokens`` trailing
    tokens with ``slot_mapping == -1`` (CUDA-graph padding) are appended.
    """
    cache_dtype = cache_dtype or dtype
    needed = sum(-(-sl // block_size) for _, sl in pairs)
    num_blocks = num_blocks or needed + 3
    ids = random.sample(range(1, num_blocks), needed)
    tables = []
    for _, sl in pairs:
        tables.append([ids.pop() for _ in range(-(-sl // block_size))])
    qlens = [p[0] for p in pairs] + [0] * pad_rows
    slens = [p[1] for p in pairs] + [0] * pad_rows
    md = plan_attention(qlens, slens, tables + [[]] * pad_rows, block_size, device=device)
    if pad_tokens:
        pad = torch.full((pad_tokens,), -1, dtype=torch.int64, device=device)
        md.slot_mapping = torch.cat([md.slot_mapping, pad])
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.empty(shape, dtype=cache_dtype, device=device)
    value_cache = torch.empty(shape, dtype=cache_dtype, device=device)
    if poison:
        key_cache.view(torch.uint8).fill_(0xFF)  # NaN in every float format, e4m3 included
        value_cache.view(torch.uint8).fill_(0xFF)
    k_scale = v_scale = None
    if cache_dtype == FP8:
        k_scale = torch.tensor([0.03], device=device)
        v_scale = torch.tensor([0.02], device=device)
    # cached prefixes (positions before this step's tokens), through the reference writer
    for (ql, sl), table in zip(pairs, tables):
        if sl - ql > 0:
            prefix = plan_attention([sl - ql], [sl - ql], [table], block_size, device=device)
            k = torch.randn(sl - ql, num_kv_heads, head_dim, device=device, dtype=dtype)
            v = torch.randn(sl - ql, num_kv_heads, head_dim, device=device, dtype=dtype)
            reference.reshape_and_cache(k, v, key_cache, value_cache, prefix.slot_mapping, k_scale=k_scale,
                                        v_scale=v_scale)
    n = md.num_tokens
    query = torch.randn(n, num_heads, head_dim, device=device, dtype=dtype)
    key = torch.randn(n, num_kv_heads, head_dim, device=device, dtype=dtype)
    value = torch.randn(n, num_kv_heads, head_dim, device=device, dtype=dtype)
    return Batch(query, key, value, key_cache, value_cache, md, k_scale, v_scale)


def assert_close_no_nan(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, *, loose: float = 1.0) -> None:
    """``out`` matches ``want`` within the dtype's tolerance (scaled by ``loose``); NaN never passes."""
    assert not torch.isnan(out).any(), "NaN in kernel output"
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), want.float(), atol=atol * loose, rtol=rtol * loose, equal_nan=False)
