"""The L2 prefetch kernel of :mod:`blocks.layers.l2_prefetch` (imported on first use; CUDA, sm_90+)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["prefetch_into_l2", "CHUNK_BYTES"]

CHUNK_BYTES = 64 * 1024  # one bulk request
_LANES = 32  # requests one program issues (one warp, one request a thread)


@triton.jit
def _bulk_prefetch_kernel(base_ptr, n_bytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(n_bytes, CHUNK)
    idx = tl.minimum(idx, n_chunks - 1)  # the tail lanes repeat the last chunk: a harmless duplicate request
    start = idx.to(tl.int64) * CHUNK
    size = tl.minimum(n_bytes - start, CHUNK).to(tl.int32)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                              [base_ptr + start, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_into_l2(weight: torch.Tensor) -> None:
    """Ask for the contiguous ``weight``'s bytes to be brought into L2, on the current stream. Its size must
    be a multiple of 16 bytes (the bulk copy's granule); other sizes are skipped."""
    n_bytes = weight.numel() * weight.element_size()
    if n_bytes == 0 or n_bytes % 16 or weight.data_ptr() % 16:
        return
    grid = triton.cdiv(triton.cdiv(n_bytes, CHUNK_BYTES), _LANES)
    _bulk_prefetch_kernel[(grid,)](weight.view(-1).view(torch.uint8), n_bytes, CHUNK=CHUNK_BYTES, BLOCK=_LANES,
                                   num_warps=1)
