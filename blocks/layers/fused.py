"""Whether a layer runs its fused Triton kernel (:mod:`blocks.layers.triton_fused`) or its torch reference.

Fused on CUDA tensors unless the environment sets ``BLOCKS_FUSED_LAYERS=0`` (for A/B timing and
debugging). The kernel module is imported on first use, so importing the layers never compiles or
imports Triton kernels, and tests can choose the interpreter first.
"""

from __future__ import annotations

import os

import torch

__all__ = ["use_fused", "FUSED_LAYERS"]

FUSED_LAYERS = os.environ.get("BLOCKS_FUSED_LAYERS", "1") != "0"


def use_fused(x: torch.Tensor) -> bool:
    """True when ``x``'s layer should call the fused kernel."""
    return FUSED_LAYERS and x.is_cuda
