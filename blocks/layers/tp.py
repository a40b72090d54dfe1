"""Tensor-parallel coordinates a layer is built with: this rank, the group size and how to reduce.

Layers in :mod:`blocks.layers` are designed for tensor parallelism from the start: each takes a
``tp=`` keyword (a :class:`TPInfo`), allocates only its rank's shard and loads only that shard
from a full checkpoint tensor. With ``tp.size == 1`` (the default) nothing is sharded and the
collectives are identity functions.

The collectives default to ``torch.distributed`` on ``tp.group``. Tests (and a future
``blocks.parallel``) can pass their own ``all_reduce`` / ``all_gather`` callables, which lets the
shard math be checked on one CPU process: build the layer once per rank, run each, and combine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TPInfo", "divide"]


def divide(numerator: int, denominator: int, *, what: str = "size") -> int:
    """``numerator // denominator``, raising ``ValueError`` naming ``what`` unless it divides evenly."""
    if denominator <= 0 or numerator % denominator != 0:
        raise ValueError(f"{what}={numerator} must be divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


@dataclass(frozen=True)
class TPInfo:
    """Where a layer sits in its tensor-parallel group.

    Attributes:
        rank: this process's rank in the group, ``0 <= rank < size``.
        size: number of ranks the layer is split over (1 = no parallelism).
        group: a ``torch.distributed`` process group (``None`` = the default group).
        all_reduce_fn: optional ``fn(tensor) -> tensor`` summing over the group; overrides
            ``torch.distributed``.
        all_gather_fn: optional ``fn(tensor, dim) -> tensor`` concatenating the ranks' tensors
            along ``dim`` in rank order; overrides ``torch.distributed``.
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    all_reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    all_gather_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tp size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tp rank must be in [0, {self.size}), got {self.rank}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group (identity when ``size == 1``)."""
        if self.size == 1:
            return x
        if self.all_reduce_fn is not None:
            return self.all_reduce_fn(x)
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(f"tensor parallelism with size {self.size} needs torch.distributed initialised")
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` in rank order (identity when ``size == 1``)."""
        if self.size == 1:
            return x
        if self.all_gather_fn is not None:
            return self.all_gather_fn(x, dim)
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(f"tensor parallelism with size {self.size} needs torch.distributed initialised")
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


TP_SINGLE = TPInfo()
