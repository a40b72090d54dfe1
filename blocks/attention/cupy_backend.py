"""The CuPy attention backend: a CUDA C paged decode kernel (``cupy.RawModule``) on NVIDIA GPUs.

Decode batches (``max_query_len <= 1``) run a CUDA kernel: the tiled split-KV kernel of
:mod:`blocks.attention.cupy_kernels_tiled` by default, or the simpler scalar kernel of
:mod:`blocks.attention.cupy_kernels` (also where the tiled one does not take the layer shape); batches with prefill
chunks, and group/head_dim combinations too wide for either kernel's registers, go to the Triton kernel (same
contract). The KV write is the Triton ``reshape_and_cache``. This module
imports ``cupy`` (an ImportError without it, which ``get_attention_backend("cupy")`` turns into a
ValueError); nothing else in ``blocks.attention`` imports this module, so the package works without cupy.

Usage::

    backend = get_attention_backend("cupy")
    backend.plan(metadata); backend.write_kv(...); out = backend.attend(q, kc, vc, metadata, scale=s)
"""

from __future__ import annotations

import cupy
import numpy as np
import torch

from blocks.attention.backend import AttentionBackend
from blocks.attention.cupy_kernels import DTYPE_KINDS, NUM_WARPS, get_kernel, max_group_dims
from blocks.attention.metadata import AttentionMetadata
from blocks.attention.triton_cache_write import reshape_and_cache
from blocks.attention.triton_paged import TritonPlan, WorkspacePool
from blocks.attention.triton_paged import paged_attention as triton_paged_attention
from blocks.attention.validation import FP8_KV_DTYPE, check_attention

__all__ = ["CupyAttentionBackend", "cupy_paged_decode_attention", "cupy_stream", "kernel_args", "dtype_kinds"]

_LUTS: dict[torch.device, torch.Tensor] = {}


def _fp8_lut(device: torch.device) -> torch.Tensor:
    """float32 ``[256]``: the value of every e4m3 bit pattern (NaN patterns included)."""
    if device not in _LUTS:
        bits = torch.arange(256, dtype=torch.uint8)
        _LUTS[device] = bits.view(FP8_KV_DTYPE).float().to(device)
    return _LUTS[device]


def cupy_stream(device: torch.device):
    """torch's current stream as a cupy stream (so launches join CUDA-graph capture and stream order)."""
    ts = torch.cuda.current_stream(device)
    if hasattr(ts, "__cuda_stream__") and hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(ts)
    return cupy.cuda.ExternalStream(ts.cuda_stream)


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def dtype_kinds(query: torch.Tensor, key_cache: torch.Tensor) -> tuple[int, int]:
    """The kernels' ``Q_KIND`` / ``KV_KIND`` compile-time element types."""
    return DTYPE_KINDS[str(query.dtype).split(".")[-1]], DTYPE_KINDS[str(key_cache.dtype).split(".")[-1]]


def kernel_args(query, key_cache, value_cache, out, metadata: AttentionMetadata, *, fp8: bool, k_scale, v_scale,
                scale: float, soft_cap: float | None, sliding_window: int | None,
                block_table: torch.Tensor | None = None) -> tuple[tuple, tuple]:
    """The arguments both CUDA kernels share, as ``(head, tail)``: ``head`` = query, caches and output
    pointers; ``tail`` = metadata pointers, the FP8 table and scales, the scalars and every stride (a kernel
    may take its own arguments between the two). ``block_table`` replaces the metadata's (the sorted walk)."""
    block_table = metadata.block_table if block_table is None else block_table
    lut = _fp8_lut(query.device) if fp8 else metadata.seq_lens  # unread without FP8: any valid pointer
    ks = k_scale if fp8 else metadata.seq_lens
    vs = v_scale if fp8 else metadata.seq_lens
    i64 = np.int64
    head = (_ptr(query), _ptr(key_cache), _ptr(value_cache), _ptr(out))
    tail = (
        _ptr(metadata.query_start_loc), _ptr(metadata.seq_lens), _ptr(block_table), _ptr(lut), _ptr(ks),
        _ptr(vs), np.float32(scale), np.float32(soft_cap if soft_cap else 0.0), np.int32(sliding_window or 0),
        np.int32(metadata.num_seqs), np.int32(query.shape[0]), np.int32(key_cache.shape[1]), i64(query.stride(0)),
        i64(query.stride(1)), i64(out.stride(0)), i64(out.stride(1)), i64(key_cache.stride(0)),
        i64(key_cache.stride(1)), i64(key_cache.stride(2)), i64(value_cache.stride(0)), i64(value_cache.stride(1)),
        i64(value_cache.stride(2)), i64(block_table.stride(0)),
    )
    return head, tail


def kernel_supports(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether the CUDA kernel handles this layer shape (registers: ``GROUP * ceil(D / 32) <= 64``)."""
    group = query.shape[1] // key_cache.shape[2]
    return group * -(-query.shape[2] // 32) <= max_group_dims()


def cupy_paged_decode_attention(
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
    """Paged attention through the CUDA C kernel; same contract as the torch reference.

    Args/Returns: as :func:`blocks.attention.reference.paged_attention` (CUDA tensors; query
    fp16/bf16/fp32; cache in the query dtype or FP8 e4m3 with float32 ``k_scale``/``v_scale``).
    Any query length is correct; one thread block per (token, KV head) re-reads the context for
    every token, so it is meant for decode rows.

    Raises:
        ValueError: before the launch, as the Triton wrapper does, and for tensors off CUDA or a
            ``GROUP * ceil(head_dim / 32)`` above 64.
    """
    fp8 = check_attention(query, key_cache, value_cache, metadata, sliding_window=sliding_window,
                          soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale, out=out)
    if query.device.type != "cuda":
        raise ValueError(f"the cupy kernel needs CUDA tensors, query is on {query.device}")
    if not kernel_supports(query, key_cache):
        raise ValueError(
            f"GROUP * ceil(head_dim / 32) = {(query.shape[1] // key_cache.shape[2]) * -(-query.shape[2] // 32)} "
            f"exceeds {max_group_dims()} for the cupy kernel"
        )
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    kernel = get_kernel(*dtype_kinds(query, key_cache), head_dim, num_heads // num_kv_heads)
    head, tail = kernel_args(query, key_cache, value_cache, out, metadata, fp8=fp8, k_scale=k_scale, v_scale=v_scale,
                             scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)
    with cupy.cuda.Device(query.device.index or 0):
        kernel((num_tokens, num_kv_heads), (NUM_WARPS * 32,), head + tail, stream=cupy_stream(query.device))
    return out


class CupyAttentionBackend(AttentionBackend):
    """Decode through the CUDA C kernel; prefill/mixed batches through Triton (see module docstring).

    Args:
        prefill_backend: ``"triton"`` (default) or ``"cupy"`` (force the CUDA kernel for every batch).
        kernel: ``"tiled"`` (default: K/V tiles staged in shared memory by ``cp.async``, split-KV;
            :mod:`cupy_tiled_launch`; on an H100 1.02-1.21x SDPA at four of the suite's five decode shapes and
            0.97x at 8 x 32768, 90-91% of the read ceiling, 0.93-0.97x the Triton kernel's speed; RESULTS.md) or
            ``"scalar"`` (one block per token and KV head, 2-byte loads; 0.01-0.44x SDPA).
    """

    name = "cupy"

    def __init__(self, *, prefill_backend: str = "triton", kernel: str = "tiled") -> None:
        if prefill_backend not in ("triton", "cupy"):
            raise ValueError(f"prefill_backend must be 'triton' or 'cupy', got {prefill_backend!r}")
        if kernel not in ("tiled", "scalar"):
            raise ValueError(f"kernel must be 'tiled' or 'scalar', got {kernel!r}")
        self.prefill_backend = prefill_backend
        self.kernel = kernel
        self.workspace = WorkspacePool()  # split-KV buffers; outlive every plan (CUDA graphs keep pointers)

    def plan(self, metadata: AttentionMetadata) -> AttentionMetadata:
        metadata.plan = TritonPlan.from_metadata(metadata, pool=self.workspace)
        return metadata

    def write_kv(self, key, value, key_cache, value_cache, metadata, *, k_scale=None, v_scale=None):
        reshape_and_cache(key, value, key_cache, value_cache, metadata.slot_mapping, k_scale=k_scale, v_scale=v_scale)

    def attend(self, query, key_cache, value_cache, metadata, **kwargs):
        if metadata.max_query_len <= 1 or self.prefill_backend == "cupy":
            if self.kernel == "tiled":
                from blocks.attention.cupy_tiled_launch import cupy_tiled_decode_attention, tiled_kernel_supports

                if tiled_kernel_supports(query, key_cache, value_cache):
                    return cupy_tiled_decode_attention(query, key_cache, value_cache, metadata, **kwargs)
            if kernel_supports(query, key_cache):
                return cupy_paged_decode_attention(query, key_cache, value_cache, metadata, **kwargs)
        if not isinstance(metadata.plan, TritonPlan):
            self.plan(metadata)
        return triton_paged_attention(query, key_cache, value_cache, metadata, **kwargs)
