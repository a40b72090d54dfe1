"""Copy named checkpoint tensors into a model's (possibly fused, possibly sharded) parameters.

:func:`load_named_weights` is the shared core of every family's ``load_weights``: it renames a
checkpoint tensor, routes fused projections (``q_proj`` -> ``qkv_proj`` shard ``"q"``, ``gate_proj``
-> ``gate_up_proj`` shard 0, ...) to their parameter's ``weight_loader`` and reports every problem
with the checkpoint tensor's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from blocks.layers.linear import copy_checked

__all__ = ["load_named_weights", "missing_weights"]


def load_named_weights(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    stacked_params_mapping: Iterable[tuple[str, str, str | int]] = (),
    rename: Callable[[str], str | None] = lambda name: name,
) -> set[str]:
    """Load ``(checkpoint_name, tensor)`` pairs into ``module``'s parameters.

    Args:
        module: the model.
        weights: full (unsharded) checkpoint tensors, any dtype (cast on copy).
        stacked_params_mapping: ``(param_part, checkpoint_part, shard_id)``: a checkpoint name
            containing ``checkpoint_part`` goes to the parameter named with ``param_part`` instead,
            through its ``weight_loader(param, tensor, shard_id)``.
        rename: maps a checkpoint name to a parameter name, or ``None`` to skip the tensor.

    Returns:
        The set of parameter names that received data (fused ones once per shard).

    Raises:
        ValueError: a tensor matches no parameter (names it) or has the wrong shape (names the
            tensor and both shapes).
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    mapping = list(stacked_params_mapping)
    loaded: set[str] = set()
    for ckpt_name, tensor in weights:
        name = rename(ckpt_name)
        if name is None:
            continue
        shard_id = None
        for param_part, ckpt_part, sid in mapping:
            if f".{ckpt_part}." in f".{name}":
                name = name.replace(ckpt_part, param_part)
                shard_id = sid
                break
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no parameter of "
                             f"{type(module).__name__} (looked for {name!r})")
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is not None:
                loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
            else:
                copy_checked(param, tensor)
        except ValueError as exc:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} (for parameter {name!r}): {exc}") from exc
        loaded.add(name if shard_id is None else f"{name}#{shard_id}")
    return loaded


def missing_weights(
    module: nn.Module,
    loaded: set[str],
    *,
    stacked_params_mapping: Iterable[tuple[str, str, str | int]] = (),
) -> list[str]:
    """Parameters (or fused shards, as ``"name#shard"``) that ``loaded`` did not cover.

    Tied parameters count once (under their first name).
    """
    mapping = list(stacked_params_mapping)
    missing = []
    for name, _ in module.named_parameters():
        shards = [sid for param_part, _, sid in mapping if f".{param_part}." in f".{name}"]
        required = [f"{name}#{sid}" for sid in shards] if shards else [name]
        missing.extend(r for r in required if r not in loaded)
    return missing
