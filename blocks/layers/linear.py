"""Linear layers designed for tensor parallelism (Megatron-style column / row splits).

Every layer owns only its rank's shard (see :class:`~blocks.layers.tp.TPInfo`) and every
parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` attribute that takes the
FULL checkpoint tensor (unsharded, as stored by Hugging Face) and copies this rank's slice into
the parameter. A loader checks the full tensor's shape first and raises ``ValueError`` with both
shapes on a mismatch, so model loaders can prefix the checkpoint name.

Shapes per rank (``tp`` = ``tp.size``; any leading dims are allowed in ``forward``):

* :class:`ReplicatedLinear`: weight ``[out, in]``; ``[..., in] -> [..., out]``.
* :class:`ColumnParallelLinear`: weight ``[out / tp, in]``; ``[..., in] -> [..., out / tp]``.
* :class:`MergedColumnParallelLinear`: weight ``[sum(out_i) / tp, in]`` (each projection's slice
  stacked); ``[..., in] -> [..., sum(out_i) / tp]``.
* :class:`QKVParallelLinear`: weight ``[(heads_r + 2 kv_heads_r) * head_dim, in]`` for this rank's
  heads; ``[..., in] -> [..., q | k | v]``.
* :class:`RowParallelLinear`: weight ``[out, in / tp]``; ``[..., in / tp] -> [..., out]``.

A column layer's output stays split over ranks unless ``gather_output=True``; a row layer sums
its partial products over ranks (``reduce_results=True``) and adds the bias once.
"""

from __future__ import annotations

import torch
from torch import nn

from blocks.layers.fused import linear
from blocks.layers.tp import TP_SINGLE, TPInfo, divide

__all__ = [
    "copy_checked",
    "ReplicatedLinear",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "RowParallelLinear",
]


def copy_checked(dst: torch.Tensor, src: torch.Tensor, *, expected_full_shape: tuple[int, ...] | None = None) -> None:
    """Copy ``src`` into ``dst`` (casting dtype/device), checking shapes first.

    Args:
        dst: destination (a parameter or a slice of one).
        src: source tensor, already narrowed to this rank's shard.
        expected_full_shape: the unsharded shape the checkpoint tensor must have (for the error).
    Raises:
        ValueError: ``src`` and ``dst`` shapes differ.
    """
    if tuple(src.shape) != tuple(dst.shape):
        want = expected_full_shape if expected_full_shape is not None else tuple(dst.shape)
        raise ValueError(f"shape mismatch: checkpoint has {tuple(src.shape)}, model expects {tuple(want)}")
    with torch.no_grad():
        dst.copy_(src)


def _check_full(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects {tuple(expected)}")


def _new_param(shape: tuple[int, ...], dtype: torch.dtype | None, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    return p


class _LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, *, tp: TPInfo | None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp = tp or TP_SINGLE

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.tp.rank}/{self.tp.size}"


class ReplicatedLinear(_LinearBase):
    """A full copy of the weight on every rank: ``y = x W^T + b``.

    Args:
        input_size, output_size: full sizes.
        bias: keyword-only, add a bias ``[output_size]``.
        params_dtype: parameter dtype (default: torch's default dtype).
        tp: tensor-parallel coordinates (unused for the math, kept for a uniform API).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False,
                 params_dtype: torch.dtype | None = None, tp: TPInfo | None = None) -> None:
        super().__init__(input_size, output_size, tp=tp)
        self.weight = _new_param((output_size, input_size), params_dtype, self.weight_loader)
        self.bias = _new_param((output_size,), params_dtype, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_checked(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., input_size] -> [..., output_size]``."""
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(_LinearBase):
    """Output features split over ranks: rank ``r`` holds rows ``[r * out/tp, (r+1) * out/tp)``.

    Args:
        input_size, output_size: full sizes; ``output_size`` must divide by ``tp.size``.
        bias: add a bias (split like the output).
        gather_output: all-gather the output so every rank sees ``[..., output_size]``.
        params_dtype: parameter dtype.
        tp: tensor-parallel coordinates.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, gather_output: bool = False,
                 params_dtype: torch.dtype | None = None, tp: TPInfo | None = None) -> None:
        super().__init__(input_size, output_size, tp=tp)
        self.gather_output = gather_output
        self.output_size_per_rank = divide(output_size, self.tp.size, what="output_size")
        self.weight = _new_param((self.output_size_per_rank, input_size), params_dtype, self.weight_loader)
        self.bias = _new_param((self.output_size_per_rank,), params_dtype, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy rows ``[rank * n, (rank + 1) * n)`` of the full ``[output_size(, input_size)]`` tensor."""
        _check_full(loaded, (self.output_size, *param.shape[1:]))
        n = param.shape[0]
        copy_checked(param, loaded.narrow(0, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., input_size] -> [..., output_size / tp]`` (or ``output_size`` with ``gather_output``)."""
        y = linear(x, self.weight, self.bias)
        return self.tp.all_gather(y, -1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (e.g. gate+up).

    Each rank holds ``[shard_0 / tp; shard_1 / tp; ...]`` stacked on the output dim, so the
    per-rank output splits cleanly into the per-projection pieces.

    Args:
        input_size: full input size.
        output_sizes: full output size of each fused projection; each must divide by ``tp.size``.
        bias, gather_output, params_dtype, tp: as :class:`ColumnParallelLinear`.

    The weight loader takes ``shard_id`` = the projection's index in ``output_sizes``.
    """

    def __init__(self, input_size: int, output_sizes: list[int], *, bias: bool = False, gather_output: bool = False,
                 params_dtype: torch.dtype | None = None, tp: TPInfo | None = None) -> None:
        tp = tp or TP_SINGLE
        for i, size in enumerate(output_sizes):
            divide(size, tp.size, what=f"output_sizes[{i}]")
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias, gather_output=gather_output,
                         params_dtype=params_dtype, tp=tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        """Copy this rank's slice of fused projection ``shard_id`` (full ``[output_sizes[i](, in)]``)."""
        if shard_id is None:  # an already-fused checkpoint tensor
            return self._load_fused(param, loaded)
        if not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be in [0, {len(self.output_sizes)}), got {shard_id}")
        _check_full(loaded, (self.output_sizes[shard_id], *param.shape[1:]))
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        copy_checked(param.narrow(0, offset, size), loaded.narrow(0, self.tp.rank * size, size))

    def _load_fused(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _check_full(loaded, (self.output_size, *param.shape[1:]))
        start = 0
        for i, size in enumerate(self.output_sizes):
            self.weight_loader(param, loaded.narrow(0, start, size), i)
            start += size


class QKVParallelLinear(_LinearBase):
    """Fused Q, K, V projections, split over ranks by attention head.

    Rank ``r`` holds query heads ``[r * H/tp, (r+1) * H/tp)``. KV heads are split the same way
    when ``num_kv_heads >= tp``; with fewer KV heads than ranks each KV head is replicated on
    ``tp / num_kv_heads`` consecutive ranks (rank ``r`` holds KV head ``r // (tp / num_kv_heads)``).

    Args:
        hidden_size: input size.
        head_dim: size of one head.
        num_heads: total query heads (divisible by ``tp.size``).
        num_kv_heads: total KV heads (divisible by ``tp.size``, or dividing it).
        bias, params_dtype, tp: as :class:`ColumnParallelLinear`.

    Output per rank: ``[..., (num_heads_per_rank + 2 * num_kv_heads_per_rank) * head_dim]`` laid out
    as ``[q | k | v]``; :meth:`split` returns the three parts. Loader ``shard_id`` is ``"q"``,
    ``"k"`` or ``"v"`` (full tensors ``[num_heads * head_dim(, hidden)]`` and
    ``[num_kv_heads * head_dim(, hidden)]``).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int | None = None, *,
                 bias: bool = False, params_dtype: torch.dtype | None = None, tp: TPInfo | None = None) -> None:
        tp = tp or TP_SINGLE
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = divide(num_heads, tp.size, what="num_heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = divide(num_kv_heads, tp.size, what="num_kv_heads")
            self.kv_head_start = tp.rank * self.num_kv_heads
        else:
            replicas = divide(tp.size, num_kv_heads, what="tp size (replicating num_kv_heads)")
            self.num_kv_heads = 1
            self.kv_head_start = tp.rank // replicas
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, tp=tp)
        self.output_size_per_rank = self.q_size + 2 * self.kv_size
        self.weight = _new_param((self.output_size_per_rank, hidden_size), params_dtype, self.weight_loader)
        self.bias = _new_param((self.output_size_per_rank,), params_dtype, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        """Copy this rank's heads of ``shard_id`` (``"q"``, ``"k"``, ``"v"``) from the full tensor; with
        ``shard_id=None`` the full tensor is the already-fused ``[q | k | v]`` of every head."""
        if shard_id is None:
            q_full = self.total_num_heads * self.head_dim
            kv_full = self.total_num_kv_heads * self.head_dim
            _check_full(loaded, (q_full + 2 * kv_full, *param.shape[1:]))
            for part, start, size in (("q", 0, q_full), ("k", q_full, kv_full), ("v", q_full + kv_full, kv_full)):
                self.weight_loader(param, loaded.narrow(0, start, size), part)
            return
        if shard_id == "q":
            _check_full(loaded, (self.total_num_heads * self.head_dim, *param.shape[1:]))
            src = loaded.narrow(0, self.tp.rank * self.q_size, self.q_size)
            dst = param.narrow(0, 0, self.q_size)
        elif shard_id in ("k", "v"):
            _check_full(loaded, (self.total_num_kv_heads * self.head_dim, *param.shape[1:]))
            src = loaded.narrow(0, self.kv_head_start * self.head_dim, self.kv_size)
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            dst = param.narrow(0, offset, self.kv_size)
        else:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        copy_checked(dst, src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., hidden_size] -> [..., q_size + 2 * kv_size]`` (this rank's heads)."""
        return linear(x, self.weight, self.bias)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[..., q + 2 kv] -> ([..., q], [..., kv], [..., kv])`` for this rank."""
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(_LinearBase):
    """Input features split over ranks: rank ``r`` holds columns ``[r * in/tp, (r+1) * in/tp)``.

    Args:
        input_size, output_size: full sizes; ``input_size`` must divide by ``tp.size``.
        bias: add a bias ``[output_size]`` once (after the reduction; on rank 0 only when
            ``reduce_results=False`` so the partial sums still add up).
        input_is_parallel: the input is already this rank's ``[..., input_size / tp]`` slice
            (the output of a column layer); otherwise the layer slices the full input.
        reduce_results: all-reduce the partial products over ranks.
        params_dtype, tp: as above.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, input_is_parallel: bool = True,
                 reduce_results: bool = True, params_dtype: torch.dtype | None = None,
                 tp: TPInfo | None = None) -> None:
        super().__init__(input_size, output_size, tp=tp)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_size_per_rank = divide(input_size, self.tp.size, what="input_size")
        self.weight = _new_param((output_size, self.input_size_per_rank), params_dtype, self.weight_loader)
        self.bias = _new_param((output_size,), params_dtype, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Weight: columns of this rank from the full ``[output_size, input_size]``; bias: copied whole."""
        if param.dim() == 1:
            return copy_checked(param, loaded)
        _check_full(loaded, (self.output_size, self.input_size))
        n = self.input_size_per_rank
        copy_checked(param, loaded.narrow(1, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., input_size / tp] -> [..., output_size]`` (full input if not ``input_is_parallel``)."""
        if not self.input_is_parallel and self.tp.size > 1:
            n = self.input_size_per_rank
            x = x.narrow(-1, self.tp.rank * n, n)
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias)
        y = linear(x, self.weight)
        if self.reduce_results:
            y = self.tp.all_reduce(y)
            return y + self.bias if self.bias is not None else y
        if self.bias is not None and self.tp.rank == 0:
            y = y + self.bias
        return y
