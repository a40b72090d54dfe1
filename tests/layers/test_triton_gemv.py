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
