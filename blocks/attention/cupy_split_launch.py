"""Launcher of the vectorised split-KV CuPy kernel (``CupyAttentionBackend(kernel="vector")``).

Correct on an H100 (GPU tests), speed not measured yet: see :mod:`blocks.attention.cupy_kernels_split`.
The split count and its workspace come from the step's :class:`~blocks.attention.triton_paged.TritonPlan`,
as for Triton. Imports ``cupy``.
"""

from __future__ import annotations

import cupy
import numpy as np
import torch

from blocks.attention.cupy_kernels import DTYPE_KINDS
from blocks.attention.cupy_kernels_split import MAX_GROUP_VEC, NUM_WARPS, get_vector_kernels, vector_width
from blocks.attention.metadata import AttentionMetadata
from blocks.attention.triton_paged import TritonPlan
from blocks.attention.validation import FP8_KV_DTYPE, check_attention

__all__ = ["cupy_split_decode_attention", "vector_kernel_supports"]

_LUTS: dict[torch.device, torch.Tensor] = {}


def _fp8_lut(device: torch.device) -> torch.Tensor:
    """float32 ``[256]``: the value of every e4m3 bit pattern (NaN patterns included)."""
    if device not in _LUTS:
        bits = torch.arange(256, dtype=torch.uint8)
        _LUTS[device] = bits.view(FP8_KV_DTYPE).float().to(device)
    return _LUTS[device]


def _cupy_stream(device: torch.device):
    """torch's current stream as a cupy stream (so launches join CUDA-graph capture and stream order)."""
    ts = torch.cuda.current_stream(device)
    if hasattr(ts, "__cuda_stream__") and hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(ts)
    return cupy.cuda.ExternalStream(ts.cuda_stream)


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
    cfg, workspace = plan.config_for(query, num_kv_heads)
    split = cfg.num_splits > 1
    vec = vector_width(head_dim, key_cache.element_size())
    attn, merge = get_vector_kernels(DTYPE_KINDS[str(query.dtype).split(".")[-1]],
                                     DTYPE_KINDS[str(key_cache.dtype).split(".")[-1]], head_dim,
                                     num_heads // num_kv_heads, vec, split)
    lut = _fp8_lut(query.device) if fp8 else metadata.seq_lens
    ks = k_scale if fp8 else metadata.seq_lens
    vs = v_scale if fp8 else metadata.seq_lens
    part_out, part_lse = workspace if split else (out, out)

    def ptr(t):
        return np.uint64(t.data_ptr())

    i64 = np.int64
    pstr = (i64(part_out.stride(0)), i64(part_out.stride(1)), i64(part_out.stride(2)), i64(part_lse.stride(0)),
            i64(part_lse.stride(1))) if split else (i64(0),) * 5
    args = (
        ptr(query), ptr(key_cache), ptr(value_cache), ptr(out), ptr(part_out), ptr(part_lse),
        ptr(metadata.query_start_loc), ptr(metadata.seq_lens), ptr(metadata.block_table), ptr(lut), ptr(ks), ptr(vs),
        np.float32(scale), np.float32(soft_cap if soft_cap else 0.0), np.int32(sliding_window or 0),
        np.int32(metadata.num_seqs), np.int32(num_tokens), np.int32(key_cache.shape[1]), i64(query.stride(0)),
        i64(query.stride(1)), i64(out.stride(0)), i64(out.stride(1)), i64(key_cache.stride(0)),
        i64(key_cache.stride(1)), i64(key_cache.stride(2)), i64(value_cache.stride(0)), i64(value_cache.stride(1)),
        i64(value_cache.stride(2)), i64(metadata.block_table.stride(0)), *pstr,
    )
    with cupy.cuda.Device(query.device.index or 0):
        stream = _cupy_stream(query.device)
        attn((num_tokens, num_kv_heads, cfg.num_splits), (NUM_WARPS * 32,), args, stream=stream)
        if split:
            merge((num_tokens, num_heads), (128,), (ptr(part_out), ptr(part_lse), ptr(out), np.int32(cfg.num_splits),
                                                   *pstr, i64(out.stride(0)), i64(out.stride(1))), stream=stream)
    return out
