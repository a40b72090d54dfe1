"""The L2 prefetch kernel of :mod:`blocks.layers.l2_prefetch` (imported on first use; CUDA, sm_90+)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["prefetch_into_l2", "prefetch_many_into_l2", "CHUNK_BYTES"]

CHUNK_BYTES = 64 * 1024  # one bulk request
_LANES = 32  # requests one program issues (one warp, one request a thread)


@triton.jit
def _prefetch_chunks(base_ptr, n_bytes, idx, CHUNK: tl.constexpr):
    n_chunks = tl.cdiv(n_bytes, CHUNK)
    idx = tl.minimum(idx, n_chunks - 1)  # the tail lanes repeat the last chunk: a harmless duplicate request
    start = idx.to(tl.int64) * CHUNK
    size = tl.minimum(n_bytes - start, CHUNK).to(tl.int32)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                              [base_ptr + start, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _bulk_prefetch_kernel(p0, n0, g0, p1, n1, g1, p2, n2, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Up to three regions in one launch: programs ``[0, g0)`` take region 0, ``[g0, g0 + g1)`` region 1, the
    rest region 2."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    if pid < g0:
        _prefetch_chunks(p0, n0, pid * BLOCK + lanes, CHUNK)
    elif pid < g0 + g1:
        _prefetch_chunks(p1, n1, (pid - g0) * BLOCK + lanes, CHUNK)
    else:
        _prefetch_chunks(p2, n2, (pid - g0 - g1) * BLOCK + lanes, CHUNK)


def prefetch_many_into_l2(weights: list[torch.Tensor]) -> None:
    """Ask for up to three contiguous weights' bytes to be brought into L2, in one launch on the current stream.
    A weight whose size or address is not a multiple of 16 bytes (the bulk copy's granule) is skipped."""
    weights = [w for w in weights if w.numel() and (w.numel() * w.element_size()) % 16 == 0 and w.data_ptr() % 16 == 0]
    if len(weights) > 3:
        raise ValueError(f"prefetch_many_into_l2 takes at most 3 weights, got {len(weights)}")
    if not weights:
        return
    args, groups = [], []
    for w in weights + [weights[-1]] * (3 - len(weights)):  # unused regions: any pointer, no programs
        n = w.numel() * w.element_size()
        args += [w.view(-1).view(torch.uint8), n]
        groups.append(triton.cdiv(triton.cdiv(n, CHUNK_BYTES), _LANES))
    groups[len(weights):] = [0] * (3 - len(weights))
    p0, n0, p1, n1, p2, n2 = args
    _bulk_prefetch_kernel[(sum(groups),)](p0, n0, groups[0], p1, n1, groups[1], p2, n2, CHUNK=CHUNK_BYTES,
                                          BLOCK=_LANES, num_warps=1)


def prefetch_into_l2(weight: torch.Tensor) -> None:
    """:func:`prefetch_many_into_l2` of one weight."""
    prefetch_many_into_l2([weight])
