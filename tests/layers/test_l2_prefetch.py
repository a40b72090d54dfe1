"""The L2 weight prefetch of decode graphs: a no-op where it cannot run, and no change to any result where it
does (it only moves data into L2), in eager mode and inside a CUDA graph capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blocks.layers import l2_prefetch


def test_off_on_cpu_and_outside_a_window(monkeypatch):
    assert not l2_prefetch.prefetch_enabled(torch.device("cpu"))
    w = torch.randn(8, 8)
    l2_prefetch.issue([w])  # no window: nothing happens (no CUDA call on a CPU box)
    with l2_prefetch.prefetch_window(torch.device("cpu")):
        assert l2_prefetch._state["window"] is None
        l2_prefetch.issue([w])
    monkeypatch.setenv("BLOCKS_L2_PREFETCH", "0")
    if torch.cuda.is_available():
        assert not l2_prefetch.prefetch_enabled(torch.device("cuda"))


def _layer(x, ws, grouped=False):
    """qkv-like GEMM, the prefetch of the rest, then the rest: the order a decoder layer issues them in."""
    h = F.linear(x, ws[0])
    l2_prefetch.issue(ws[1:], grouped=grouped)
    for w in ws[1:]:
        h = F.linear(torch.tanh(h), w)
    return h


@pytest.mark.gpu
@pytest.mark.parametrize("budget_mb", [64, 1])  # everything fits / nothing fits (all or nothing)
@pytest.mark.parametrize("grouped", [False, True])  # one launch a weight / one for all three
def test_results_unchanged_eager_and_in_a_graph(budget_mb, grouped):
    dev = torch.device("cuda")
    if not l2_prefetch.prefetch_enabled(dev):
        pytest.skip("needs compute capability 9.0+")
    g = torch.Generator(device=dev).manual_seed(0)
    # [out, in]; the third is 8,763,126 bytes, not a multiple of the bulk granule (16): skipped, not faulted
    dims = [(1536, 896), (901, 1536), (4863, 901), (896, 4863)]
    ws = [torch.randn(o, i, device=dev, dtype=torch.bfloat16, generator=g) * i ** -0.5 for o, i in dims]
    x = torch.randn(3, 896, device=dev, dtype=torch.bfloat16, generator=g)
    want = _layer(x, ws)
    budget = budget_mb << 20
    with l2_prefetch.prefetch_window(dev, budget_bytes=budget):
        got = _layer(x, ws, grouped)
        issued = len(l2_prefetch._state["window"]["events"])
    assert issued == (1 if budget_mb == 64 else 0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with (torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream),
          l2_prefetch.prefetch_window(dev, budget_bytes=budget)):
        out = _layer(static_x, ws, grouped)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        static_x.copy_(torch.randn(3, 896, device=dev, dtype=torch.bfloat16, generator=g))
        graph.replay()
        torch.testing.assert_close(out, _layer(static_x, ws), rtol=0, atol=0)
