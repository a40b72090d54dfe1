"""Plain-PyTorch reference for paged attention: the ground truth every kernel is tested against.

Shapes (DESIGN.md section 3):
    query:        [num_tokens, num_heads, head_dim]
    key, value:   [num_tokens, num_kv_heads, head_dim]   (this step's new tokens)
    key_cache:    [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache:  [num_blocks, block_size, num_kv_heads, head_dim]

Readable over fast: one Python loop over sequences, scores in float32.
"""

from __future__ import annotations

import torch

from blocks.attention.metadata import AttentionMetadata

__all__ = ["reshape_and_cache", "paged_attention", "physical_walk_table", "FP8_KV_DTYPE"]

FP8_KV_DTYPE = torch.float8_e4m3fn


def _quantize(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    if cache_dtype == FP8_KV_DTYPE:
        if scale is None:
            raise ValueError("an FP8 KV cache needs k_scale and v_scale")
        finfo = torch.finfo(FP8_KV_DTYPE)
        return (x.float() / scale.float()).clamp(finfo.min, finfo.max).to(cache_dtype)
    return x.to(cache_dtype)


def _dequantize(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if x.dtype == FP8_KV_DTYPE:
        return x.float() * (1.0 if scale is None else scale.float())
    return x.float()


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write new tokens' K and V into their cache slots, in place.

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]``.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``; FP8
            (e4m3) caches store ``x / scale``.
        slot_mapping: ``[num_tokens]`` int64; ``-1`` entries are skipped.
        k_scale, v_scale: float32 scalars (tensors), required for an FP8 cache.
    """
    num_blocks, block_size = key_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat_k = key_cache.view(num_blocks * block_size, *key_cache.shape[2:])
    flat_v = value_cache.view(num_blocks * block_size, *value_cache.shape[2:])
    flat_k[slots] = _quantize(key[keep], key_cache.dtype, k_scale)
    flat_v[slots] = _quantize(value[keep], value_cache.dtype, v_scale)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context.

    Query token ``j`` of sequence ``i`` sits at position ``seq_lens[i] - query_len_i + j`` and
    attends to cache positions ``p <= `` its own position; with ``sliding_window = W`` only to
    the last ``W`` positions (``pos - p < W``, as transformers' Mistral defines it). With
    ``soft_cap = c`` scores become ``c * tanh(scores / c)``. GQA: query head ``h`` reads KV
    head ``h // (num_heads // num_kv_heads)``.

    Args:
        query: ``[num_tokens, num_heads, head_dim]``.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, already
            holding this step's K/V (see :func:`reshape_and_cache`).
        metadata: the step's :class:`AttentionMetadata`.
        scale: softmax scale (usually ``head_dim ** -0.5``).
        out: optional ``[num_tokens, num_heads, head_dim]`` output buffer.

    Returns:
        ``[num_tokens, num_heads, head_dim]`` in ``query.dtype``. Rows of padding tokens
        (beyond ``query_start_loc[-1]``) are zero.
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.zeros_like(query)
    else:
        out.zero_()
    starts = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    for i, seq_len in enumerate(seq_lens):
        q_start, q_end = starts[i], starts[i + 1]
        query_len = q_end - q_start
        if query_len == 0 or seq_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = metadata.block_table[i, :num_blocks].long()
        k = _dequantize(key_cache[blocks], k_scale).reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = _dequantize(value_cache[blocks], v_scale).reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        q = query[q_start:q_end].float()  # [query_len, num_heads, head_dim]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if soft_cap is not None and soft_cap > 0:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None and sliding_window > 0:
            allowed &= (q_pos - k_pos) < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


def physical_walk_table(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[num_seqs, width]`` int32: each row's blocks in the order a decode program should read them.

    Row ``i`` holds the ``ceil(seq_lens[i] / block_size) - 1`` full blocks of ``block_table[i]`` sorted by
    physical id, then its last (possibly partial) block. So the first ``seq_lens[i]`` key slots of the walk
    are exactly the sequence's keys, and the mask ``key < seq_len`` of a one-token query still holds; only
    the order of the keys changes. Entries past the last block are never read: here they keep their
    place, the Triton version leaves them unwritten. Device ops only (a sort along rows), no sync: capturable in a
    CUDA graph.
    """
    width = block_table.shape[1]
    slot = torch.arange(width, device=block_table.device, dtype=torch.int64)
    last = (seq_lens.to(torch.int64) + block_size - 1) // block_size - 1  # index of each row's last block
    full = slot[None, :] < last[:, None]
    # full blocks sort by their id; the rest keep their place after them (keys past any block id)
    key = torch.where(full, block_table.to(torch.int64), (1 << 40) + slot[None, :])
    return block_table.gather(1, key.argsort(dim=1)).to(torch.int32)
