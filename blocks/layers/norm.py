"""Normalisation layers: RMSNorm (optionally fused with the residual add) and LayerNorm.

RMSNorm follows the Llama definition that transformers uses: the statistics and the scaling are
computed in float32, the result is cast back to the input dtype and then multiplied by the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocks.layers.fused import use_fused

__all__ = ["RMSNorm", "LayerNorm"]


class RMSNorm(nn.Module):
    """``y = weight * x / sqrt(mean(x^2) + eps)`` over the last dimension.

    Args:
        hidden_size: size of the normalised (last) dimension.
        eps: keyword-only epsilon added to the mean square.
        params_dtype: dtype of ``weight`` (default: torch's default dtype).

    ``forward(x)`` takes ``[..., hidden_size]`` and returns the same shape and dtype.
    ``forward(x, residual)`` first computes ``s = x + residual`` (in the input dtype) and returns
    ``(rmsnorm(s), s)``: the new residual stream comes back with the normalised value, so a
    decoder layer needs one call per norm. On CUDA both forms run as one fused Triton kernel
    (:func:`blocks.layers.triton_fused.rms_norm`) with the same roundings.
    """

    def __init__(self, hidden_size: int, *, eps: float = 1e-6, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"RMSNorm expects last dim {self.hidden_size}, got shape {tuple(x.shape)}")
        if use_fused(x) and x.stride(-1) == 1:
            return self._fused(x, residual)
        if residual is None:
            return self._norm(x)
        s = x + residual
        return self._norm(s), s

    def _fused(self, x: torch.Tensor, residual: torch.Tensor | None):
        from blocks.layers.triton_fused import rms_norm

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        r2 = residual.reshape(-1, shape[-1]) if residual is not None else None
        out, s = rms_norm(x2, self.weight, self.eps, r2)
        if residual is None:
            return out.view(shape)
        return out.view(shape), s.view(shape)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class LayerNorm(nn.Module):
    """Standard LayerNorm over the last dimension (``torch.nn.functional.layer_norm``).

    Args:
        hidden_size: size of the normalised dimension.
        eps: keyword-only epsilon (transformers' OPT uses the torch default ``1e-5``).
        elementwise_affine: keep ``weight`` and ``bias`` parameters.
        params_dtype: parameter dtype.

    ``forward(x)``: ``[..., hidden_size] -> [..., hidden_size]``, same dtype.
    """

    def __init__(self, hidden_size: int, *, eps: float = 1e-5, elementwise_affine: bool = True,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype), requires_grad=False)
        else:
            self.weight = None
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
