"""The KV cache tensor: one allocation for all layers, with per-layer views.

Layout (DESIGN.md section 3): ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.
Layer ``l`` uses ``key_cache = kv[l, 0]`` and ``value_cache = kv[l, 1]``, each
``[num_blocks, block_size, num_kv_heads, head_dim]``. Block ids are shared by all layers.

Sizing from a byte budget (what ``gpu_memory_utilization`` leaves for the cache)::

    per_block = bytes_per_block(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    num_blocks = num_blocks_for_budget(20 * 2**30, num_layers=32, block_size=16, num_kv_heads=8, head_dim=128,
                                       dtype=torch.bfloat16)            # 20 GiB -> 10240 blocks
    kv = allocate_kv_cache_for_budget(20 * 2**30, 32, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
"""

from __future__ import annotations

import torch

__all__ = ["allocate_kv_cache", "layer_views", "bytes_per_token", "bytes_per_block", "num_blocks_for_budget",
           "allocate_kv_cache_for_budget"]


def _check_positive(**fields: int) -> None:
    for name, v in fields.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def bytes_per_token(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """KV bytes one token occupies across all layers, K and V: ``num_layers * 2 * num_kv_heads * head_dim *
    itemsize`` (e.g. Llama-3-8B in bf16: 32 * 2 * 8 * 128 * 2 = 131072 bytes = 128 KiB)."""
    _check_positive(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
    return num_layers * 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """Bytes of one block id across all layers, K and V: ``block_size * bytes_per_token(...)``."""
    _check_positive(block_size=block_size)
    return block_size * bytes_per_token(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                        dtype=dtype)


def num_blocks_for_budget(budget_bytes: int, *, num_layers: int, block_size: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype, min_blocks: int = 1) -> int:
    """How many whole blocks fit in ``budget_bytes`` (floor). Raises ValueError below ``min_blocks``."""
    per_block = bytes_per_block(num_layers=num_layers, block_size=block_size, num_kv_heads=num_kv_heads,
                                head_dim=head_dim, dtype=dtype)
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
    n = budget_bytes // per_block
    if n < min_blocks:
        raise ValueError(f"budget_bytes={budget_bytes} holds {n} blocks of {per_block} bytes; at least "
                         f"min_blocks={min_blocks} needed ({min_blocks * per_block} bytes)")
    return n


def allocate_kv_cache_for_budget(
    budget_bytes: int,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    min_blocks: int = 1,
) -> torch.Tensor:
    """Allocate the largest cache that fits ``budget_bytes``: ``[num_layers, 2, num_blocks, block_size,
    num_kv_heads, head_dim]`` with ``num_blocks = num_blocks_for_budget(...)`` (read it from ``shape[2]``)."""
    n = num_blocks_for_budget(budget_bytes, num_layers=num_layers, block_size=block_size, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, dtype=dtype, min_blocks=min_blocks)
    return allocate_kv_cache(num_layers, n, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Allocate the whole cache, ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.

    The memory is left uninitialised (``torch.empty``): attention never reads a slot before it
    is written.
    """
    for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                    ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    return torch.empty(shape, dtype=dtype, device=device)


def layer_views(kv_cache: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(key_cache, value_cache)`` views of a cache from :func:`allocate_kv_cache`."""
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError(
            "kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    return [(kv_cache[layer, 0], kv_cache[layer, 1]) for layer in range(kv_cache.shape[0])]
