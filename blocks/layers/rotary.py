"""Rotary position embeddings (RoPE), neox and gpt-j styles, with the scalings transformers defines.

For a rotary dimension ``r`` (``r <= head_dim``; the remaining dims pass through untouched) and
base ``theta``, frequency ``i`` is ``inv_freq[i] = theta ** (-2 i / r)`` and position ``p`` rotates
pair ``i`` by the angle ``p * inv_freq[i]``. The two styles differ only in which dims form a pair:

* neox (Llama, Mistral, Qwen, the transformers default): pair ``(x[i], x[i + r/2])``;
* gpt-j: pair ``(x[2 i], x[2 i + 1])`` (interleaved).

Scalings (``rope_type`` of the Hugging Face ``rope_scaling`` / ``rope_parameters`` dict):

* ``"default"``: none.
* ``"linear"``: ``inv_freq / factor`` (positions interpolated by ``factor``).
* ``"dynamic"`` (dynamic NTK): while ``seq_len = max(positions) + 1`` exceeds
  ``max_position_embeddings``, ``theta`` becomes
  ``theta * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (r / (r - 2))``. As in
  transformers, ``seq_len`` comes from the positions of the current call (here: the whole batch),
  which needs one host read of ``positions.max()`` per call; it equals transformers exactly for one
  sequence whose positions only grow (prefill then decode).
* ``"llama3"``: frequencies with wavelength ``2 pi / inv_freq`` above
  ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, those below
  ``original_max_position_embeddings / high_freq_factor`` are kept, and those in between are
  blended with ``s = (original_max_position_embeddings / wavelength - low_freq_factor) /
  (high_freq_factor - low_freq_factor)`` as ``(1 - s) * inv_freq / factor + s * inv_freq``.

Angles are computed in float32 from the positions of each forward (``T * r / 2`` multiplies and two
transcendental ops, once per model forward, shared by all layers through :meth:`cos_sin` and
:meth:`rotate`), so there is no cache to outgrow. ``cos`` and ``sin`` are cast to the input dtype
before they are applied, like transformers does. On CUDA, :meth:`rotate` is one fused Triton kernel
that rotates queries and keys in place (:func:`blocks.layers.triton_fused.rotary_inplace`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from blocks.layers.fused import use_fused

__all__ = ["RotaryEmbedding", "ROPE_TYPES", "rope_inv_freq"]

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_inv_freq(rotary_dim: int, base: float | torch.Tensor) -> torch.Tensor:
    """``[rotary_dim / 2]`` float32 inverse frequencies ``base ** (-2 i / rotary_dim)``."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (base ** exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    factor = float(params["factor"])
    low = float(params["low_freq_factor"])
    high = float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flattened queries and keys.

    Args:
        head_dim: size of one attention head.
        rotary_dim: keyword-only, leading dims of each head that rotate (default ``head_dim``).
        base: ``rope_theta``.
        max_position_embeddings: the model's context length (used by ``"dynamic"``).
        is_neox_style: ``True`` for neox pairs, ``False`` for gpt-j (interleaved) pairs.
        scaling: the ``rope_scaling`` dict (``rope_type`` or legacy ``type`` plus its fields) or
            ``None``; see the module docstring.

    ``forward(positions, query, key)``: ``positions [T]`` int64, ``query [T, num_heads * head_dim]``
    or ``[T, num_heads, head_dim]``, ``key`` likewise with ``num_kv_heads``. Returns rotated
    ``(query, key)`` with the input shapes and dtypes (new tensors; inputs are not modified).
    """

    def __init__(self, head_dim: int, *, rotary_dim: int | None = None, base: float = 10000.0,
                 max_position_embeddings: int = 2048, is_neox_style: bool = True,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.max_position_embeddings = max_position_embeddings
        self.is_neox_style = is_neox_style
        scaling = dict(scaling or {})
        self.rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        self.scaling = scaling
        inv_freq = rope_inv_freq(rotary_dim, self.base)
        if self.rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq_for(self, positions: torch.Tensor) -> torch.Tensor:
        if self.rope_type != "dynamic" or positions.numel() == 0:
            return self.inv_freq
        seq_len = int(positions.max()) + 1  # host read: dynamic NTK depends on the longest context
        max_pos = self.max_position_embeddings
        if seq_len <= max_pos:
            return self.inv_freq
        factor = float(self.scaling["factor"])
        dim = self.rotary_dim
        ratio = torch.tensor(factor * seq_len / max_pos - (factor - 1), dtype=torch.float32)
        base = self.base * ratio ** (dim / (dim - 2))
        return rope_inv_freq(dim, base).to(self.inv_freq.device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [T]`` -> ``(cos, sin)``, each ``[T, rotary_dim / 2]`` float32."""
        inv_freq = self._inv_freq_for(positions).to(positions.device)
        angles = positions.float()[:, None] * inv_freq[None, :]
        return angles.cos(), angles.sin()

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], -1, self.head_dim)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        cos = cos[:, None, :].to(x.dtype)
        sin = sin[:, None, :].to(x.dtype)
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        if rest.shape[-1]:
            out = torch.cat((out, rest), dim=-1)
        return out.reshape(shape)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() != 1 or positions.shape[0] != query.shape[0] or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"positions must be [T] matching query/key's first dim, got positions {tuple(positions.shape)}, "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}"
            )
        cos, sin = self.cos_sin(positions)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def rotate(self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate with precomputed ``(cos, sin) = self.cos_sin(positions)`` (one computation per forward
        for all layers). Shapes as :meth:`forward`, 2-D ``[T, heads * head_dim]`` rows. On CUDA the
        rotation happens **in place** on ``query`` and ``key`` (views of a fused QKV output are fine)
        and they are returned; elsewhere new tensors are returned."""
        if (use_fused(query) and query.dim() == 2 and key.dim() == 2 and query.stride(1) == 1
                and key.stride(1) == 1):
            from blocks.layers.triton_fused import rotary_inplace

            rotary_inplace(query, key, cos, sin, head_dim=self.head_dim, is_neox_style=self.is_neox_style)
            return query, key
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def extra_repr(self) -> str:
        style = "neox" if self.is_neox_style else "gptj"
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, {style}, {self.rope_type}"
