"""Tensor parallelism: process-group setup (:mod:`blocks.parallel.state`); the shard-aware layers live in
:mod:`blocks.layers` and take the :class:`~blocks.layers.tp.TPInfo` returned here."""

from blocks.parallel.state import DistConfig, destroy_tensor_parallel, device_for, init_tensor_parallel

__all__ = ["DistConfig", "init_tensor_parallel", "destroy_tensor_parallel", "device_for"]
