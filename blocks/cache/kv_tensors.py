"""The KV cache tensor: one allocation for all layers, with per-layer views.

Layout (DESIGN.md section 3): ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.
Layer ``l`` uses ``key_cache = kv[l, 0]`` and ``value_cache = kv[l, 1]``, each
``[num_blocks, block_size, num_kv_heads, head_dim]``. Block ids are shared by all layers.
"""

from __future__ import annotations

import torch

__all__ = ["allocate_kv_cache", "layer_views"]


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
