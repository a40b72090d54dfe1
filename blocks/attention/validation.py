"""Host-side checks run by the kernel wrappers before any launch (shapes, dtypes, layouts).

Every check reads only tensor attributes and the metadata's host integers: no device sync, so the
checks are safe inside CUDA-graph capture. Each failure is a ``ValueError`` naming the field and
the limit.
"""

from __future__ import annotations

import torch

from blocks.attention.metadata import AttentionMetadata

__all__ = ["check_cache_write", "check_attention", "MODEL_DTYPES", "FP8_KV_DTYPE"]

MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_KV_DTYPE = torch.float8_e4m3fn
MAX_HEAD_DIM = 256


def _check_cache_pair(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.dim() != 4:
        raise ValueError(
            "key_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(key_cache.shape)}"
        )
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} != key_cache shape {tuple(key_cache.shape)}")
    if value_cache.dtype != key_cache.dtype:
        raise ValueError(f"value_cache dtype {value_cache.dtype} != key_cache dtype {key_cache.dtype}")
    if key_cache.dtype not in (*MODEL_DTYPES, FP8_KV_DTYPE):
        raise ValueError(f"key_cache dtype must be one of {(*MODEL_DTYPES, FP8_KV_DTYPE)}, got {key_cache.dtype}")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(3) != 1 or t.stride(2) != t.shape[3]:
            raise ValueError(
                f"{name} must have contiguous [num_kv_heads, head_dim] rows (strides (..., head_dim, 1)), "
                f"got strides {t.stride()}"
            )


def _check_scales(fp8: bool, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, device) -> None:
    if not fp8:
        return
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"an FP8 KV cache needs {name} (float32 tensor of one element)")
        if s.dtype != torch.float32 or s.numel() != 1 or s.device != device:
            raise ValueError(f"{name} must be a one-element float32 tensor on {device}, got {s.dtype} {tuple(s.shape)}")


def check_cache_write(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale) -> bool:
    """Validate :func:`reshape_and_cache` arguments; return whether the cache is FP8."""
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"key and value must both be [num_tokens, num_kv_heads, head_dim], got {tuple(key.shape)} "
            f"and {tuple(value.shape)}"
        )
    if key.dtype not in MODEL_DTYPES or value.dtype != key.dtype:
        raise ValueError(f"key/value dtype must be one of {MODEL_DTYPES} and equal, got {key.dtype}/{value.dtype}")
    _check_cache_pair(key_cache, value_cache)
    if tuple(key_cache.shape[2:]) != tuple(key.shape[1:]):
        raise ValueError(
            f"key_cache [num_kv_heads, head_dim] = {tuple(key_cache.shape[2:])} does not match key's "
            f"{tuple(key.shape[1:])}"
        )
    fp8 = key_cache.dtype == FP8_KV_DTYPE
    if not fp8 and key_cache.dtype != key.dtype:
        raise ValueError(f"key_cache dtype {key_cache.dtype} must equal key dtype {key.dtype} (or be FP8 e4m3)")
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key and value must have a contiguous last (head_dim) dimension")
    if slot_mapping.dtype != torch.int64 or slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping must be int64 [num_tokens={key.shape[0]}], got {slot_mapping.dtype} "
            f"{tuple(slot_mapping.shape)}"
        )
    for name, t in (("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        if t.device != key.device:
            raise ValueError(f"{name} is on {t.device} but key is on {key.device}")
    _check_scales(fp8, k_scale, v_scale, key.device)
    return fp8


def check_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    *,
    sliding_window: int | None,
    soft_cap: float | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    out: torch.Tensor | None,
) -> bool:
    """Validate paged-attention arguments; return whether the cache is FP8."""
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got shape {tuple(query.shape)}")
    if query.dtype not in MODEL_DTYPES:
        raise ValueError(f"query dtype must be one of {MODEL_DTYPES}, got {query.dtype}")
    if query.stride(2) != 1:
        raise ValueError("query must have a contiguous last (head_dim) dimension")
    _check_cache_pair(key_cache, value_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    fp8 = key_cache.dtype == FP8_KV_DTYPE
    if not fp8 and key_cache.dtype != query.dtype:
        raise ValueError(f"key_cache dtype {key_cache.dtype} must equal query dtype {query.dtype} (or be FP8 e4m3)")
    if cache_head_dim != head_dim:
        raise ValueError(f"key_cache head_dim {cache_head_dim} != query head_dim {head_dim}")
    if not 16 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [16, {MAX_HEAD_DIM}], got {head_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if metadata.block_size != block_size:
        raise ValueError(f"metadata.block_size {metadata.block_size} != key_cache block_size {block_size}")
    if num_tokens != metadata.num_tokens:
        raise ValueError(f"query has {num_tokens} tokens but metadata.slot_mapping has {metadata.num_tokens}")
    num_seqs = metadata.num_seqs
    for name, t, shape in (
        ("query_start_loc", metadata.query_start_loc, (num_seqs + 1,)),
        ("seq_lens", metadata.seq_lens, (num_seqs,)),
    ):
        if t.dtype != torch.int32 or tuple(t.shape) != shape:
            raise ValueError(f"metadata.{name} must be int32 {list(shape)}, got {t.dtype} {list(t.shape)}")
    bt = metadata.block_table
    if bt.dtype != torch.int32 or bt.dim() != 2 or bt.shape[0] != num_seqs or bt.stride(1) != 1:
        raise ValueError(
            f"metadata.block_table must be int32 [num_seqs={num_seqs}, max_blocks_per_seq] with contiguous "
            f"rows, got {bt.dtype} {list(bt.shape)} strides {bt.stride()}"
        )
    if bt.shape[1] * block_size < metadata.max_seq_len:
        raise ValueError(
            f"metadata.block_table is too narrow: {bt.shape[1]} blocks x block_size {block_size} = "
            f"{bt.shape[1] * block_size} tokens < max_seq_len {metadata.max_seq_len}"
        )
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache), ("query_start_loc",
                    metadata.query_start_loc), ("seq_lens", metadata.seq_lens), ("block_table", bt)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if sliding_window is not None and sliding_window < 0:
        raise ValueError(f"sliding_window must be None or >= 0, got {sliding_window}")
    if soft_cap is not None and soft_cap < 0:
        raise ValueError(f"soft_cap must be None or >= 0, got {soft_cap}")
    _check_scales(fp8, k_scale, v_scale, query.device)
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype or out.device != query.device
                            or out.stride(2) != 1):
        raise ValueError(
            f"out must be {query.dtype} {tuple(query.shape)} on {query.device} with a contiguous last dim, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return fp8
