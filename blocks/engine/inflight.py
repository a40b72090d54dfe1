"""Input token ids that are still on the device: the asynchronous engine's one extra kernel.

An asynchronous engine launches step ``k + 1`` before the host has read step ``k``'s sampled ids, so a
decode row of step ``k + 1`` whose input is the token its request sampled at step ``k`` gets a placeholder in
the host-built inputs and ``src[row]`` = that request's row in step ``k``'s sampled ids; :func:`gather_inflight`
then writes ``ids[row] = prev[src[row]]`` on the device, in stream order after step ``k``'s sampler (which
left its ids in ``prev``). Rows with ``src[row] < 0`` keep their host-built id. In a decode CUDA graph this is
the graph's first kernel, reading the graph's static ``src`` inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_inflight"]

_BLOCK = 512


@triton.jit(do_not_specialize=["n"])  # one variant for every batch size: no compile mid-run
def _gather_inflight_kernel(ids_ptr, src_ptr, prev_ptr, n, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    src = tl.load(src_ptr + rows, mask=ok, other=-1)
    take = ok & (src >= 0)
    tok = tl.load(prev_ptr + tl.maximum(src, 0), mask=take, other=0)
    tl.store(ids_ptr + rows, tok, mask=take)


def gather_inflight(ids: torch.Tensor, src: torch.Tensor, prev: torch.Tensor) -> None:
    """``ids[i] = prev[src[i]]`` where ``src[i] >= 0``, in place, without a host sync.

    Args:
        ids: ``[n]`` int64 input token ids (device).
        src: ``[n]`` int64 rows of ``prev`` or -1.
        prev: ``[m]`` int64 the last step's sampled ids.
    """
    n = ids.numel()
    if n == 0:
        return
    if ids.is_cuda:
        _gather_inflight_kernel[(triton.cdiv(n, _BLOCK),)](ids, src, prev, n, BLOCK=_BLOCK, num_warps=4)
    else:
        take = src >= 0
        ids[take] = prev[src[take]]
