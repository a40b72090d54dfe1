"""Launcher of the tiled split-KV CuPy kernel (``CupyAttentionBackend(kernel="tiled")``, the default).

The kernel is :mod:`blocks.attention.cupy_kernels_tiled`. The split count, its workspace and the sorted walk of
few long decode rows come from the step's :class:`~blocks.attention.triton_paged.TritonPlan`, as for Triton.
Imports ``cupy``.
"""

from __future__ import annotations

import cupy
import numpy as np
import torch

from blocks.attention.cupy_backend import cupy_stream, dtype_kinds, kernel_args
from blocks.attention.cupy_kernels_tiled import MAX_GROUP_DIMS, NUM_WARPS, get_tiled_kernels, group_pad
from blocks.attention.metadata import AttentionMetadata
from blocks.attention.triton_paged import TritonPlan
from blocks.attention.validation import check_attention

__all__ = ["cupy_tiled_decode_attention", "tiled_kernel_supports"]


def tiled_kernel_supports(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor | None = None
) -> bool:
    """Whether the CUDA kernel handles this layer: ``GP * ceil(head_dim / 32) <= MAX_GROUP_DIMS`` registers (GP:
    the group size rounded up to a power of two) and cache rows that start on 16 bytes and are a whole number of
    16-byte copies long."""
    group = query.shape[1] // key_cache.shape[2]
    head_dim = query.shape[2]
    gp = group_pad(group)
    size = key_cache.element_size()
    if gp * -(-head_dim // 32) > MAX_GROUP_DIMS or (head_dim * size) % 16:
        return False
    for cache in (key_cache,) if value_cache is None else (key_cache, value_cache):
        if any((st * size) % 16 for st in cache.stride()[:3]) or cache.data_ptr() % 16:
            return False
    return True


def cupy_tiled_decode_attention(
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
    """Paged attention through the tiled split-KV CUDA kernel; the reference's contract.

    Args/Returns: as :func:`blocks.attention.reference.paged_attention` (CUDA tensors; query
    fp16/bf16/fp32; cache in the query dtype or FP8 e4m3 with float32 ``k_scale``/``v_scale``).
    Any query length is correct; one thread block per (token, KV head, split) re-reads the context
    for every token, so it is meant for decode rows. The split count (flash-decoding) and its
    workspace come from the metadata's :class:`~blocks.attention.triton_paged.TritonPlan`.

    Raises:
        ValueError: before the launch, as the Triton wrapper does, and for tensors off CUDA or a
            layer the kernel does not handle (:func:`tiled_kernel_supports`).
    """
    fp8 = check_attention(query, key_cache, value_cache, metadata, sliding_window=sliding_window,
                          soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale, out=out)
    if query.device.type != "cuda":
        raise ValueError(f"the cupy kernel needs CUDA tensors, query is on {query.device}")
    if not tiled_kernel_supports(query, key_cache, value_cache):
        raise ValueError(
            f"the cupy kernel needs GROUP (rounded up to a power of two) * ceil(head_dim / 32) <= {MAX_GROUP_DIMS} and "
            "cache rows aligned to 16-byte copies "
            f"(num_heads={query.shape[1]}, num_kv_heads={key_cache.shape[2]}, head_dim={query.shape[2]})"
        )
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    plan = metadata.plan
    if not isinstance(plan, TritonPlan):
        plan = metadata.plan = TritonPlan.from_metadata(metadata)
    whole = plan.launches_for(query, num_kv_heads, split_mixed=False)[0]  # this kernel takes the whole batch
    cfg, workspace = whole.config, whole.workspace
    split = cfg.num_splits > 1
    attn, merge, smem = get_tiled_kernels(*dtype_kinds(query, key_cache), head_dim, num_heads // num_kv_heads,
                                          key_cache.element_size(), key_cache.shape[1], split, query.device.index or 0)
    part_out, part_lse = workspace if split else (out, out)
    i64 = np.int64
    pstr = (i64(part_out.stride(0)), i64(part_out.stride(1)), i64(part_out.stride(2)), i64(part_lse.stride(0)),
            i64(part_lse.stride(1))) if split else (i64(0),) * 5
    block_table = None  # few long decode rows read their blocks in physical order, as the Triton kernel does
    if cfg.sorted_walk and plan.max_query_len <= 1 and not (sliding_window and sliding_window > 0):
        block_table = plan.walk_for(metadata, key_cache.shape[1])
    head, tail = kernel_args(query, key_cache, value_cache, out, metadata, fp8=fp8, k_scale=k_scale, v_scale=v_scale,
                             scale=scale, soft_cap=soft_cap, sliding_window=sliding_window, block_table=block_table)
    parts = (np.uint64(part_out.data_ptr()), np.uint64(part_lse.data_ptr()))
    with cupy.cuda.Device(query.device.index or 0):
        stream = cupy_stream(query.device)
        attn((num_tokens, num_kv_heads, cfg.num_splits), (NUM_WARPS * 32,), head + parts + tail + pstr,
             shared_mem=smem, stream=stream)
        if split:
            merge((num_tokens, num_heads), (128,), (*parts, head[3], np.int32(cfg.num_splits), *pstr,
                                                   i64(out.stride(0)), i64(out.stride(1))), stream=stream)
    return out
