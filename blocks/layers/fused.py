"""Whether a layer runs its fused Triton kernel (:mod:`blocks.layers.triton_fused`) or its torch reference.

Fused on CUDA tensors unless the environment sets ``BLOCKS_FUSED_LAYERS=0`` (for A/B timing and
debugging). :func:`linear` is ``F.linear`` unless ``BLOCKS_SKINNY_GEMM=1`` opts decode-sized CUDA inputs
into the Triton skinny GEMM (:mod:`blocks.layers.triton_gemv`, not yet measured on an H100). Kernel
modules are imported on first use, so importing the layers never compiles or imports Triton kernels, and
tests can choose the interpreter first.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["use_fused", "linear", "FUSED_LAYERS", "SKINNY_GEMM"]

FUSED_LAYERS = os.environ.get("BLOCKS_FUSED_LAYERS", "1") != "0"
SKINNY_GEMM = os.environ.get("BLOCKS_SKINNY_GEMM", "0") == "1"


def use_fused(x: torch.Tensor) -> bool:
    """True when ``x``'s layer should call the fused kernel."""
    return FUSED_LAYERS and x.is_cuda


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with ``BLOCKS_SKINNY_GEMM=1``, 2-D CUDA inputs of at most 16 rows go
    through :func:`blocks.layers.triton_gemv.skinny_linear` instead."""
    if (SKINNY_GEMM and x.is_cuda and x.dim() == 2 and x.shape[0] <= 16 and x.stride(1) == 1
            and weight.stride(1) == 1):
        from blocks.layers.triton_gemv import skinny_linear

        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
