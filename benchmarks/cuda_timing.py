"""Device time of a call with a cold L2: the timing every GPU benchmark here shares.

Every iteration first writes a 256 MiB buffer (flushes the 50 MB L2), queues a ~0.5 ms GPU sleep (so Python
launch overhead is hidden, as CUDA-graph replay hides it), then times the call with CUDA events; the figure is
the median over iterations.
"""

from __future__ import annotations

import statistics

import torch

__all__ = ["time_cuda"]

_FLUSH: dict[str, torch.Tensor] = {}


def time_cuda(fn, *, iters: int = 30, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs, each after a 256 MiB L2-flushing write."""
    flush = _FLUSH.setdefault("buf", torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.fill_(1)
        # keep the GPU busy while the host enqueues: the figure is device time, not launch overhead
        torch.cuda._sleep(1_000_000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)
