"""Launcher of the vectorised split-KV CuPy kernel (``CupyAttentionBackend(kernel="vector")``).

Correct on an H100 (GPU tests), speed not measured yet: see :mod:`blocks.attention.cupy_kernels_split`.
The split count and its workspace come from the step's :class:`~blocks.attention.triton_paged.TritonPlan`,
as for Triton. Imports ``cupy``.
"""

from __future__ import annotations

import cupy
import numpy as np
import torch

from blocks.attention.cupy_backend import cupy_stream, dtype_kinds, kernel_args
from blocks.attention.cupy_kernels_split import MAX_GROUP_VEC, NUM_WARPS, get_vector_kernels, vector_width
from blocks.attention.metadata import AttentionMetadata
from blocks.attention.triton_paged import TritonPlan
from blocks.attention.validation import check_attention

__all__ = ["cupy_split_decode_attention", "vector_kernel_supports"]

def vector_kernel_supports(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor | None = None
) -> bool:
    """Whether the CUDA kernel handles this layer: ``GROUP * VEC <= 64`` registers, aligned vector rows."""
    group = query.shape[1] // key_cache.shape[2]
    head_dim = query.shape[2]
    vec = vector_width(head_dim, key_cache.element_size())
    if group * vec > MAX_GROUP_VEC or head_dim % vec:
        return False
    for cache in (key_cache,) if value_cache is None else (key_cache, value_cache):
        if any(st % vec for st in cache.stride()[:3]) or cache.data_ptr() % (vec * cache.element_size()):
            return False
    return True


def cupy_split_decode_attention(
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
    """Paged attention through the vectorised split-KV CUDA kernel; the reference's contract.

    Args/Returns: as :func:`blocks.attention.reference.paged_attention` (CUDA tensors; query
    fp16/bf16/fp32; cache in the query dtype or FP8 e4m3 with float32 ``k_scale``/``v_scale``).
    Any query length is correct; one thread block per (token, KV head, split) re-reads the context
    for every token, so it is meant for decode rows. The split count (flash-decoding) and its
    workspace come from the metadata's :class:`~blocks.attention.triton_paged.TritonPlan`.

    Raises:
        ValueError: before the launch, as the Triton wrapper does, and for tensors off CUDA or a
            layer the kernel does not handle (:func:`vector_kernel_supports`).
    """
    fp8 = check_attention(query, key_cache, value_cache, metadata, sliding_window=sliding_window,
                          soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale, out=out)
    if query.device.type != "cuda":
        raise ValueError(f"the cupy kernel needs CUDA tensors, query is on {query.device}")
    if not vector_kernel_supports(query, key_cache, value_cache):
        raise ValueError(
            "the cupy kernel needs GROUP * vector width <= 64 and cache rows aligned to its vector loads "
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
    vec = vector_width(head_dim, key_cache.element_size())
    attn, merge = get_vector_kernels(*dtype_kinds(query, key_cache), head_dim, num_heads // num_kv_heads, vec, split)
    part_out, part_lse = workspace if split else (out, out)
    i64 = np.int64
    pstr = (i64(part_out.stride(0)), i64(part_out.stride(1)), i64(part_out.stride(2)), i64(part_lse.stride(0)),
            i64(part_lse.stride(1))) if split else (i64(0),) * 5
    head, tail = kernel_args(query, key_cache, value_cache, out, metadata, fp8=fp8, k_scale=k_scale, v_scale=v_scale,
                             scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)
    parts = (np.uint64(part_out.data_ptr()), np.uint64(part_lse.data_ptr()))
    with cupy.cuda.Device(query.device.index or 0):
        stream = cupy_stream(query.device)
        attn((num_tokens, num_kv_heads, cfg.num_splits), (NUM_WARPS * 32,), head + parts + tail + pstr, stream=stream)
        if split:
            merge((num_tokens, num_heads), (128,), (*parts, head[3], np.int32(cfg.num_splits), *pstr,
                                                   i64(out.stride(0)), i64(out.stride(1))), stream=stream)
    return out
