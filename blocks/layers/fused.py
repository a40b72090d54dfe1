"""Whether a layer runs its fused Triton kernel (:mod:`blocks.layers.triton_fused`) or its torch reference.

Fused on CUDA tensors unless the environment sets ``BLOCKS_FUSED_LAYERS=0`` (for A/B timing and
debugging). :func:`linear` is ``F.linear`` except for the decode shapes where the Triton slab GEMV beat
cuBLAS on an H100 (and, opt-in with ``BLOCKS_SKINNY_GEMM=1``, the split-K skinny GEMM, slower than cuBLAS
there); both in :mod:`blocks.layers.triton_gemv`. Kernel
modules are imported on first use, so importing the layers never compiles or imports Triton kernels, and
tests can choose the interpreter first.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["use_fused", "use_decode_fusion", "linear", "FUSED_LAYERS", "SKINNY_GEMM", "SLAB_GEMV", "DECODE_FUSION"]

FUSED_LAYERS = os.environ.get("BLOCKS_FUSED_LAYERS", "1") != "0"
# Decode steps of one token run a Llama-family layer as six kernels instead of twelve
# (:mod:`blocks.layers.triton_decode_fused`); ``BLOCKS_DECODE_FUSION=0`` turns it off. Two tokens a launch ran
# slower than the unfused layers on an H100 (RESULTS.md), so one.
DECODE_FUSION = os.environ.get("BLOCKS_DECODE_FUSION", "1") != "0"
DECODE_FUSION_MAX_ROWS = 1
DECODE_FUSION_MAX_K = 16384  # the norm needs a whole row in one register chunk
SKINNY_GEMM = os.environ.get("BLOCKS_SKINNY_GEMM", "0") == "1"
SLAB_GEMV = os.environ.get("BLOCKS_SLAB_GEMV", "1") != "0"
# Where the slab GEMV beat cuBLAS inside a decode graph (H100, RESULTS.md): 1-2 rows, weights of 24 MB or
# more with K in one register chunk (every Llama-3-8B projection and its LM head; Qwen2.5-0.5B's LM head).
# Not Qwen2.5-0.5B's small layers (+-1% on an H100, 14% slower on an H200).
SLAB_ROWS = 2
SLAB_MAX_K = 16384
SLAB_MIN_WEIGHT_BYTES = int(os.environ.get("BLOCKS_SLAB_MIN_MB", "24")) << 20


def use_fused(x: torch.Tensor) -> bool:
    """True when ``x``'s layer should call the fused kernel."""
    return FUSED_LAYERS and x.is_cuda


def use_decode_fusion(num_tokens: int, hidden_size: int, device: torch.device) -> bool:
    """True when a decoder layer should run its fused decode kernels on ``num_tokens`` hidden rows of
    ``hidden_size`` on ``device``: CUDA, one token, ``hidden_size <= 16384`` (the layer checks its own
    conditions too)."""
    return (DECODE_FUSION and FUSED_LAYERS and device.type == "cuda" and 1 <= num_tokens <= DECODE_FUSION_MAX_ROWS
            and hidden_size <= DECODE_FUSION_MAX_K)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``. On CUDA, decode inputs of 1-2 rows with weights of 24 MB or more and
    ``K <= 16384`` go through the slab GEMV (:func:`blocks.layers.triton_gemv.slab_linear`; ``BLOCKS_SLAB_GEMV=0``
    turns it off); with ``BLOCKS_SKINNY_GEMM=1``, other 2-D CUDA inputs of at most 16 rows go through
    :func:`blocks.layers.triton_gemv.skinny_linear`."""
    if (SLAB_GEMV and x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= SLAB_ROWS and x.shape[1] <= SLAB_MAX_K
            and x.stride(1) == 1 and weight.stride(1) == 1
            and weight.numel() * weight.element_size() >= SLAB_MIN_WEIGHT_BYTES):
        from blocks.layers.triton_gemv import slab_linear

        return slab_linear(x, weight, bias)
    if (SKINNY_GEMM and x.is_cuda and x.dim() == 2 and x.shape[0] <= 16 and x.stride(1) == 1
            and weight.stride(1) == 1):
        from blocks.layers.triton_gemv import skinny_linear

        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
