"""The Triton skinny GEMM against ``F.linear``: CPU interpreter in fp32/fp16 (one split and several, bias or
not, odd sizes), and bf16 on a GPU, also inside a CUDA graph."""

import pytest
import torch
import torch.nn.functional as F

from blocks.layers import triton_gemv

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _check(m, n, k, dtype, bias, split_k, device="cpu"):
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    got = triton_gemv.skinny_linear(x, w, b, split_k=split_k, block_n=16 if device == "cpu" else 64,
                                    block_k=32 if device == "cpu" else 128)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == (m, n) and got.dtype == dtype and not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 37, 100), (5, 64, 96), (16, 50, 257)])
@pytest.mark.parametrize("split_k", [1, 3])
def test_skinny_linear_matches_f_linear(dtype, m, n, k, split_k):
    _check(m, n, k, dtype, bias=(m % 2 == 1), split_k=split_k)


def test_skinny_linear_refuses_bad_shapes():
    with pytest.raises(ValueError, match="share K"):
        triton_gemv.skinny_linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="rows"):
        triton_gemv.skinny_linear(torch.randn(17, 8), torch.randn(4, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (8, 6144, 4096), (1, 1152, 896), (16, 4096, 14336)])
def test_skinny_linear_bf16_on_gpu(m, n, k):
    _check(m, n, k, torch.bfloat16, bias=True, split_k=None, device="cuda")


@pytest.mark.gpu
def test_skinny_linear_in_a_cuda_graph():
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    triton_gemv.skinny_linear(x, w)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_gemv.skinny_linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), atol=0.06, rtol=1.6e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 37, 100), (3, 64, 96), (4, 50, 257), (2, 5, 1000), (2, 3, 20000)])
def test_slab_linear_matches_f_linear(dtype, m, n, k):
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype) if m % 2 else None
    got = triton_gemv.slab_linear(x, w, b)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == (m, n) and got.dtype == dtype and not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])


def test_slab_linear_refuses_what_it_cannot_hold():
    for x, w in ((torch.randn(5, 8), torch.randn(4, 8)), (torch.randn(1, 40000), torch.randn(4, 40000)),
                 (torch.randn(2, 8), torch.randn(4, 9))):
        with pytest.raises(ValueError, match="slab_linear"):
            triton_gemv.slab_linear(x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (4, 6144, 4096), (1, 1152, 896), (2, 896, 4864),
                                   (3, 9728, 896), (2, 4096, 14336)])
def test_slab_linear_bf16_on_gpu_and_in_a_graph(m, n, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(triton_gemv.slab_linear(x, w, b).float(), F.linear(x.float(), w.float(), b.float()),
                               atol=0.06, rtol=1.6e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_gemv.slab_linear(x, w, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float(), b.float()), atol=0.06, rtol=1.6e-2)


@pytest.mark.gpu
def test_linear_dispatches_decode_rows_of_large_weights_to_the_slab_gemv(monkeypatch):
    from blocks.layers import fused

    calls = []
    monkeypatch.setattr(triton_gemv, "slab_linear", lambda *a: calls.append(a[0].shape) or F.linear(*a))
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)  # 32 MB
    small = torch.randn(896, 896, device="cuda", dtype=torch.bfloat16)
    for rows in (1, 2, 3):
        fused.linear(torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16), w)
        fused.linear(torch.randn(rows, 896, device="cuda", dtype=torch.bfloat16), small)
    assert calls == ([(1, 4096), (2, 4096)] if fused.SLAB_GEMV else [])
