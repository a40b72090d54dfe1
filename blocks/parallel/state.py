"""Tensor-parallel process groups on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

``init_tensor_parallel`` joins (or creates) the default process group from explicit arguments or
the usual environment variables that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), so the same code runs under ``torchrun`` on one node or several,
and returns the :class:`~blocks.layers.tp.TPInfo` that layers and ``load_model(..., tp=...)`` take.

Example (two processes, each runs)::

    tp = init_tensor_parallel()                    # from torchrun's environment
    model = load_model(path, tp=tp, device=device_for(tp))
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from blocks.layers.tp import TP_SINGLE, TPInfo

__all__ = ["init_tensor_parallel", "destroy_tensor_parallel", "device_for", "DistConfig"]


class DistConfig:
    """Where this process sits: ``rank``, ``world_size``, ``local_rank``, rendezvous address and port."""

    def __init__(self, *, rank: int | None = None, world_size: int | None = None, local_rank: int | None = None,
                 master_addr: str | None = None, master_port: int | None = None) -> None:
        env = os.environ
        self.rank = int(rank if rank is not None else env.get("RANK", 0))
        self.world_size = int(world_size if world_size is not None else env.get("WORLD_SIZE", 1))
        self.local_rank = int(local_rank if local_rank is not None else env.get("LOCAL_RANK", self.rank))
        self.master_addr = master_addr or env.get("MASTER_ADDR", "127.0.0.1")
        self.master_port = int(master_port if master_port is not None else env.get("MASTER_PORT", 29500))
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")


def device_for(tp: TPInfo, *, device_type: str | None = None) -> torch.device:
    """The device of this rank: ``cuda:<local rank>`` when CUDA is used, else the CPU."""
    kind = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", tp.rank))
        return torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_tensor_parallel(tensor_parallel_size: int | None = None, *, backend: str | None = None,
                         config: DistConfig | None = None, timeout_s: float = 120.0) -> TPInfo:
    """Join the process group and return this rank's :class:`TPInfo` (all ranks form one TP group).

    Args:
        tensor_parallel_size: expected group size (default: the world size); a mismatch is an error.
        backend: ``"nccl"`` or ``"gloo"`` (default: NCCL when CUDA is available, else gloo).
        config: explicit coordinates (default: from the environment, as ``torchrun`` sets them).
        timeout_s: how long collectives wait before failing (a dead peer must not hang us forever).

    Raises:
        ValueError: the size does not match the world size, or NCCL is asked for more ranks than GPUs.
    """
    cfg = config or DistConfig()
    size = cfg.world_size if tensor_parallel_size is None else tensor_parallel_size
    if size != cfg.world_size:
        raise ValueError(f"tensor_parallel_size={size} but the world has {cfg.world_size} processes")
    if size == 1:
        return TP_SINGLE
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs on NCCL; {torch.cuda.device_count()} visible")
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(
            backend, init_method=f"tcp://{cfg.master_addr}:{cfg.master_port}", rank=cfg.rank,
            world_size=cfg.world_size, timeout=timedelta(seconds=timeout_s),
        )
    return TPInfo(rank=dist.get_rank(), size=dist.get_world_size())


def destroy_tensor_parallel() -> None:
    """Leave the process group (safe to call when none was joined, or with a dead peer).

    gloo's teardown never waits, so it is used as is. NCCL's ``destroy_process_group`` waits on the
    other ranks' communicators, and on an H100 pair it hung after CUDA graphs had captured collectives;
    every caller here has finished its collectives first (the stop command was broadcast, or a peer is
    dead), so the communicators are aborted instead, which returns at once and resets the group."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if dist.get_backend() == "nccl" and abort is not None:
        torch.cuda.synchronize()
        abort()
    if dist.is_initialized():
        dist.destroy_process_group()
