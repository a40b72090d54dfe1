"""Prefetch weights into L2 while the attention runs (decode CUDA graphs on Hopper and newer).

At decode batch sizes a forward is a weight stream broken by gaps: between a layer's QKV projection and its
output projection the GPU runs rotary, the KV write, attention and the split merge, which read almost nothing
from memory at short contexts, and each small GEMM after them starts cold. While a prefetch window is open
(:func:`prefetch_window`; the decode-graph capture opens one for every batch size), :func:`issue` forks a side
stream that asks the memory system to pull the given weights into L2 (one ``cp.async.bulk.prefetch.L2``
request per 64 KB; the kernel holds no SM while the data moves) when they fit a byte budget together. Nothing
on the main stream waits for it: a GEMM that starts before its weights have arrived reads them from memory
as before. The side stream joins the main stream when the window closes.

H100, decode graphs replayed alone (``benchmarks/RESULTS.md``): Qwen2.5-0.5B, whose o_proj, gate_up and down
weights (28 MB a layer) fit L2 together, 1.000 -> 0.935 ms a step at batch 1 and 1.760 -> 1.716 ms at 256.
Llama-3-8B's do not fit (350 MB), so it is unchanged. Waiting for each prefetch before its GEMM lost (the
cross-stream edges cost more than the L2 hits gave), and a prefetch by plain loads held the SMs and lost.

``BLOCKS_L2_PREFETCH=0`` turns it off; ``BLOCKS_L2_PREFETCH_MB`` sets the budget per :func:`issue` call
(default 70% of the device's L2). Off on GPUs before compute capability 9.0 and under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["prefetch_enabled", "prefetch_window", "issue"]

# A grouped issue() is one launch for all its weights. The fused batch-1 layers ask for it: their main stream
# outran the side stream's three launches a layer, and the graph's end waited for it (H100, Qwen2.5-0.5B: 907-923
# us a step, 783 without prefetch, 762-765 grouped). The unfused layers keep one launch a weight (batch 8:
# 1022 against 1092 grouped). BLOCKS_L2_PREFETCH_GROUPED=0 turns grouping off.
GROUPED = os.environ.get("BLOCKS_L2_PREFETCH_GROUPED", "1") != "0"
_state: dict = {"window": None}  # the open window: {"stream", "budget", "events"}
_side: dict[torch.device, torch.cuda.Stream] = {}


def prefetch_enabled(device: torch.device) -> bool:
    """Whether :func:`prefetch_window` prefetches on ``device`` (see the module docstring)."""
    if os.environ.get("BLOCKS_L2_PREFETCH", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@contextlib.contextmanager
def prefetch_window(device: torch.device, *, budget_bytes: int | None = None):
    """Open a prefetch window on ``device`` for the forwards run inside it (a decode-graph capture).

    ``budget_bytes`` caps what one :func:`issue` call prefetches (default ``BLOCKS_L2_PREFETCH_MB`` or 70% of
    the device's L2). A no-op unless :func:`prefetch_enabled`. Open the first window of a
    device outside a graph capture: it creates the side stream."""
    if not prefetch_enabled(device):
        yield
        return
    if budget_bytes is None:
        mb = os.environ.get("BLOCKS_L2_PREFETCH_MB")
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        budget_bytes = int(float(mb) * 2**20) if mb else int(0.7 * l2)
    if device not in _side:
        _side[device] = torch.cuda.Stream(device)
    window = {"stream": _side[device], "budget": budget_bytes, "events": []}
    prev, _state["window"] = _state["window"], window
    try:
        yield
    finally:
        _state["window"] = prev
        main = torch.cuda.current_stream(device)
        for ev in window["events"]:  # join the side stream (a graph capture must end joined)
            main.wait_event(ev)


def issue(weights, *, grouped: bool = False) -> None:
    """Inside an open window: prefetch ``weights`` (contiguous tensors) on the side stream if together they fit
    the budget; else, or outside a window, nothing. All or nothing: on an H100 prefetching only Llama-3-8B's
    o_proj (the first of its three) gained 0.5% at some batch sizes and lost 1-2% at others. ``grouped``: one
    launch for up to three weights (see ``GROUPED``)."""
    window = _state["window"]
    if window is None:
        return
    weights = list(weights)
    if sum(w.numel() * w.element_size() for w in weights) > window["budget"] or not all(
            w.is_contiguous() for w in weights):
        return
    from blocks.layers.triton_l2_prefetch import prefetch_into_l2, prefetch_many_into_l2  # loaded on first use

    main, side = torch.cuda.current_stream(), window["stream"]
    side.wait_stream(main)
    with torch.cuda.stream(side):
        if grouped and GROUPED and len(weights) <= 3:
            prefetch_many_into_l2(weights)
        else:
            for w in weights:
                prefetch_into_l2(w)
    ev = torch.cuda.Event()
    ev.record(side)
    window["events"].append(ev)
