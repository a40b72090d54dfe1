"""Attention backends: chosen once at construction, never per call.

A backend has three methods that a model's attention layer and the runner use:

* ``plan(metadata)`` once per step, before the forward: stores backend state (kernel choice,
  split count, workspace) in ``metadata.plan`` and returns the metadata.
* ``write_kv(key, value, key_cache, value_cache, metadata)`` per layer: KV write by
  ``metadata.slot_mapping``.
* ``attend(query, key_cache, value_cache, metadata, scale=...)`` per layer: paged attention.

``"torch"`` is the reference (any device). ``"auto"`` picks ``"triton"`` on CUDA when it is
available, else ``"torch"``.
"""

from __future__ import annotations

import torch

from blocks.attention import reference
from blocks.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "TorchAttentionBackend", "get_attention_backend", "BACKEND_NAMES"]

BACKEND_NAMES = ("auto", "torch", "triton", "cupy")


class AttentionBackend:
    """Interface of an attention backend (see module docstring for the call order)."""

    name = "base"

    def plan(self, metadata: AttentionMetadata) -> AttentionMetadata:
        return metadata

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        *,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        raise NotImplementedError

    def attend(
        self,
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
        raise NotImplementedError


class TorchAttentionBackend(AttentionBackend):
    """The plain-torch reference as a backend (CPU tests, and any device as a fallback)."""

    name = "torch"

    def write_kv(self, key, value, key_cache, value_cache, metadata, *, k_scale=None, v_scale=None):
        reference.reshape_and_cache(
            key, value, key_cache, value_cache, metadata.slot_mapping, k_scale=k_scale, v_scale=v_scale
        )

    def attend(self, query, key_cache, value_cache, metadata, **kwargs):
        return reference.paged_attention(query, key_cache, value_cache, metadata, **kwargs)


def get_attention_backend(name: str = "auto", device: torch.device | str | None = None) -> AttentionBackend:
    """Return the backend called ``name`` (one of :data:`BACKEND_NAMES`) for ``device``."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention backend must be one of {BACKEND_NAMES}, got {name!r}")
    device = torch.device(device) if device is not None else None
    if name == "auto":
        on_cuda = device is not None and device.type == "cuda"
        name = "triton" if on_cuda else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        try:
            from blocks.attention.triton_backend import TritonAttentionBackend
        except ImportError as exc:  # the Triton backend lands with the kernels
            raise ValueError(f"attention backend 'triton' is unavailable: {exc}") from exc
        return TritonAttentionBackend()
    try:
        from blocks.attention.cupy_backend import CupyAttentionBackend
    except ImportError as exc:
        raise ValueError(f"attention backend 'cupy' is unavailable (needs cupy and CUDA): {exc}") from exc
    return CupyAttentionBackend()
