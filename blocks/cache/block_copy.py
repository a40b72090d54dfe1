"""Batched block copy on the KV cache tensor: performs the copy-on-write pairs of the KV cache manager.

``kv_cache`` has the DESIGN.md layout ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``
(any dtype: fp32, fp16, bf16, fp8, ...). Copying pair ``(src, dst)`` sets ``kv_cache[:, :, dst] =
kv_cache[:, :, src]`` for every layer, K and V (block ids are shared by all layers).

Pairs apply **in order**, as if one at a time: a later pair may read a block an earlier pair wrote (a
request forked twice in one step). :func:`plan_copy_waves` splits the list into waves of independent pairs
(no block written twice, none both read and written), and each wave is one kernel launch, so the usual
case (all pairs independent) is a single launch.

Usage (the runner, once per step, before the forward pass)::

    block_copy(kv_cache, kv_cache_manager.take_copies())        # list of (src, dst) ints
    block_copy(kv_cache, mapping_tensor)                         # int64 [num_pairs, 2], one independent wave

Backends: ``"triton"`` (one program per (pair, layer x K/V, chunk of the block), the data moved as raw bits
so every dtype works, also under ``TRITON_INTERPRET=1``), ``"torch"`` (index gather/scatter per wave), and
``"auto"`` (triton on CUDA, torch on CPU). :func:`block_copy_reference` is the plain one-pair-at-a-time
definition the tests compare against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["block_copy", "block_copy_reference", "plan_copy_waves"]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1024  # elements per program


def plan_copy_waves(pairs: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Split ordered ``(src, dst)`` pairs into consecutive waves whose pairs can run concurrently.

    Within a wave no block is written twice and no block is both read and written, so a parallel copy of
    the wave equals copying its pairs one by one. O(len(pairs)). Pairs with ``src == dst`` are dropped.
    """
    waves: list[list[tuple[int, int]]] = []
    wave: list[tuple[int, int]] = []
    reads: set[int] = set()
    writes: set[int] = set()
    for src, dst in pairs:
        if src == dst:
            continue
        if src in writes or dst in reads or dst in writes:
            waves.append(wave)
            wave, reads, writes = [], set(), set()
        wave.append((src, dst))
        reads.add(src)
        writes.add(dst)
    if wave:
        waves.append(wave)
    return waves


def _check_cache(kv_cache: torch.Tensor) -> None:
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        shape = tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__
        raise ValueError("kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {shape}")


def _check_pairs(pairs: Sequence[tuple[int, int]], num_blocks: int) -> None:
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"block_mapping entries must be (src, dst) pairs, got {pair!r}")
        for b in pair:
            if not 0 <= b < num_blocks:
                raise ValueError(f"block_mapping holds block id {b}, outside [0, num_blocks={num_blocks})")


def block_copy_reference(kv_cache: torch.Tensor, block_mapping: Sequence[tuple[int, int]]) -> None:
    """In place, one pair at a time: ``kv_cache[:, :, dst] = kv_cache[:, :, src]``. The definition."""
    _check_cache(kv_cache)
    _check_pairs(block_mapping, kv_cache.shape[2])
    for src, dst in block_mapping:
        kv_cache[:, :, dst] = kv_cache[:, :, src]


@triton.jit
def _block_copy_kernel(kv_ptr, map_ptr, stride_layer, stride_kv, stride_block, block_numel,
                       CHUNK: tl.constexpr):
    pair = tl.program_id(0)
    lk = tl.program_id(1)  # layer * 2 + (0 for K, 1 for V)
    chunk = tl.program_id(2)
    src = tl.load(map_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(map_ptr + 2 * pair + 1).to(tl.int64)
    base = (lk // 2).to(tl.int64) * stride_layer + (lk % 2).to(tl.int64) * stride_kv
    offs = chunk.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    x = tl.load(kv_ptr + base + src * stride_block + offs, mask=mask)
    tl.store(kv_ptr + base + dst * stride_block + offs, x, mask=mask)


def _inner_contiguous(kv_cache: torch.Tensor) -> bool:
    _, _, _, bs, h, d = kv_cache.shape
    s = kv_cache.stride()
    return (d == 1 or s[5] == 1) and (h == 1 or s[4] == d) and (bs == 1 or s[3] == h * d)


def _copy_wave_triton(kv_cache: torch.Tensor, mapping: torch.Tensor) -> None:
    num_layers, _, _, bs, h, d = kv_cache.shape
    bits = kv_cache.view(_INT_VIEW[kv_cache.element_size()])
    block_numel = bs * h * d
    grid = (mapping.shape[0], 2 * num_layers, triton.cdiv(block_numel, _CHUNK))
    s = bits.stride()
    _block_copy_kernel[grid](bits, mapping, s[0], s[1], s[2], block_numel, CHUNK=_CHUNK)


def _copy_wave_torch(kv_cache: torch.Tensor, mapping: torch.Tensor) -> None:
    src, dst = mapping[:, 0], mapping[:, 1]
    kv_cache[:, :, dst] = kv_cache[:, :, src]


def block_copy(kv_cache: torch.Tensor, block_mapping: Sequence[tuple[int, int]] | torch.Tensor, *,
               backend: str = "auto") -> None:
    """Copy blocks in place for all layers, K and V.

    Args:
        kv_cache: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``, any dtype; the
            per-block ``[block_size, num_kv_heads, head_dim]`` part must be contiguous for ``"triton"``
            (``"auto"`` falls back to torch otherwise).
        block_mapping: ordered ``(src, dst)`` pairs (list of int pairs, validated and split into waves), or
            an int64 tensor ``[num_pairs, 2]`` on the cache's device forming ONE independent wave (not
            validated: no host sync).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.
    """
    _check_cache(kv_cache)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and kv_cache.is_cuda and _inner_contiguous(kv_cache))
    if use_triton:
        if not _inner_contiguous(kv_cache):
            raise ValueError("backend='triton' needs each block [block_size, num_kv_heads, head_dim] contiguous, "
                             f"got strides {kv_cache.stride()}")
        if not kv_cache.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1")
    copy_wave = _copy_wave_triton if use_triton else _copy_wave_torch
    if isinstance(block_mapping, torch.Tensor):
        if block_mapping.dim() != 2 or block_mapping.shape[1] != 2 or block_mapping.dtype != torch.int64:
            raise ValueError(f"block_mapping tensor must be int64 [num_pairs, 2], got {block_mapping.dtype} "
                             f"{tuple(block_mapping.shape)}")
        if block_mapping.device != kv_cache.device:
            raise ValueError(f"block_mapping must be on the cache's device {kv_cache.device}, "
                             f"got {block_mapping.device}")
        if block_mapping.shape[0]:
            copy_wave(kv_cache, block_mapping.contiguous())
        return
    pairs = [(int(s), int(d)) for s, d in block_mapping]
    _check_pairs(pairs, kv_cache.shape[2])
    for wave in plan_copy_waves(pairs):
        mapping = torch.tensor(wave, dtype=torch.int64)
        if kv_cache.is_cuda:
            mapping = mapping.pin_memory().to(kv_cache.device, non_blocking=True)
        copy_wave(kv_cache, mapping)
