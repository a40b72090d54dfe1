"""Activations: SiLU-and-multiply for gated MLPs, and the plain ones by their transformers names.

``get_act_fn(name)`` accepts the ``hidden_act`` / ``activation_function`` strings of Hugging Face
configs with the same meaning: ``"gelu"`` is the exact (erf) GELU, ``"gelu_new"``,
``"gelu_pytorch_tanh"`` and ``"gelu_fast"`` the tanh approximation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocks.layers.fused import use_fused

__all__ = ["SiluAndMul", "get_act_fn", "ACT_NAMES"]


class SiluAndMul(nn.Module):
    """``[..., 2 d] -> [..., d]``: ``silu(x[..., :d]) * x[..., d:]`` (gate first, then up); one fused
    Triton kernel on CUDA (:func:`blocks.layers.triton_fused.silu_and_mul`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError(f"SiluAndMul needs an even last dim, got shape {tuple(x.shape)}")
        if use_fused(x) and x.stride(-1) == 1:
            from blocks.layers.triton_fused import silu_and_mul

            shape = x.shape
            return silu_and_mul(x.reshape(-1, shape[-1])).view(*shape[:-1], shape[-1] // 2)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class _Act(nn.Module):
    def __init__(self, name: str, fn) -> None:
        super().__init__()
        self.name = name
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


_ACTS = {
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}
ACT_NAMES = tuple(sorted(_ACTS))


def get_act_fn(name: str) -> nn.Module:
    """The activation called ``name`` (a Hugging Face activation name) as a module, shape-preserving."""
    key = name.lower()
    if key not in _ACTS:
        raise ValueError(f"activation must be one of {ACT_NAMES}, got {name!r}")
    return _Act(key, _ACTS[key])
