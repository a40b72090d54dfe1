"""The attention layer of a decoder: write this step's K/V into the paged cache, then attend.

The heavy lifting is done by an attention backend chosen once when the model is built
(:func:`blocks.attention.backend.get_attention_backend`); this layer only reshapes and forwards
the per-layer cache views and the step's :class:`~blocks.attention.metadata.AttentionMetadata`.
"""

from __future__ import annotations

import torch
from torch import nn

from blocks.attention.backend import AttentionBackend, get_attention_backend
from blocks.attention.metadata import AttentionMetadata

__all__ = ["Attention"]


class Attention(nn.Module):
    """Paged causal self-attention for one layer (this rank's heads).

    Args:
        num_heads: query heads on this rank.
        head_dim: size of one head.
        num_kv_heads: keyword-only, KV heads on this rank (``num_heads`` must be a multiple).
        scale: softmax scale (default ``head_dim ** -0.5``).
        backend: the attention backend (default: the ``"torch"`` reference).
        sliding_window: attend only to the last ``sliding_window`` positions (``None`` = all).
        soft_cap: tanh soft-capping of the scores (``None`` = off).

    Buffers ``k_scale`` and ``v_scale`` (float32 scalars, 1.0) are the per-tensor scales of an FP8
    KV cache; a loader may overwrite them.

    ``forward(query, key, value, kv_cache, metadata)``: ``query [T, num_heads * head_dim]``,
    ``key``/``value [T, num_kv_heads * head_dim]``, ``kv_cache = (key_cache, value_cache)`` each
    ``[num_blocks, block_size, num_kv_heads, head_dim]``. Returns ``[T, num_heads * head_dim]`` in
    the query's dtype.
    """

    def __init__(self, num_heads: int, head_dim: int, *, num_kv_heads: int | None = None,
                 scale: float | None = None, backend: AttentionBackend | None = None,
                 sliding_window: int | None = None, soft_cap: float | None = None) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        self.backend = backend if backend is not None else get_attention_backend("torch")
        self.sliding_window = sliding_window
        self.soft_cap = soft_cap
        self.register_buffer("k_scale", torch.tensor(1.0, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.tensor(1.0, dtype=torch.float32), persistent=False)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = query.shape[0]
        q = query.view(num_tokens, self.num_heads, self.head_dim)
        k = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        self.backend.write_kv(k, v, key_cache, value_cache, metadata, k_scale=self.k_scale, v_scale=self.v_scale)
        return self.attend(q, kv_cache, metadata)

    def attend(self, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
               metadata: AttentionMetadata) -> torch.Tensor:
        """Attention over a cache that already holds this step's K/V (written by a fused kernel):
        ``query [T, num_heads * head_dim]`` or ``[T, num_heads, head_dim]`` -> ``[T, num_heads * head_dim]``."""
        num_tokens = query.shape[0]
        q = query.view(num_tokens, self.num_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        out = self.backend.attend(q, key_cache, value_cache, metadata, scale=self.scale,
                                  sliding_window=self.sliding_window, soft_cap=self.soft_cap,
                                  k_scale=self.k_scale, v_scale=self.v_scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window={self.sliding_window}, backend={self.backend.name}")
