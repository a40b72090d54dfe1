"""The fused Triton layer kernels against the layers' torch references.

CPU: the interpreter, fp32 and fp16 (bf16 is broken in the interpreter here). GPU (marker ``gpu``):
bf16 and fp16 through the layers themselves, which take the fused path on CUDA.
"""

import pytest
import torch

from blocks.layers import triton_fused
from blocks.layers.activation import SiluAndMul
from blocks.layers.norm import RMSNorm
from blocks.layers.rotary import RotaryEmbedding

CPU_DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(actual, expected, dtype):
    assert not torch.isnan(actual).any()
    torch.testing.assert_close(actual, expected, atol=TOL[dtype], rtol=TOL[dtype])


def _norm(hidden, dtype, device="cpu"):
    norm = RMSNorm(hidden, eps=1e-5, params_dtype=dtype).to(device)
    norm.weight.data.normal_(1.0, 0.5)
    return norm


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("hidden", [16, 23, 896])
def test_rms_norm_kernel_matches_reference(dtype, hidden):
    norm = _norm(hidden, dtype)
    x = (torch.randn(5, hidden) * 3).to(dtype)
    out, none = triton_fused.rms_norm(x, norm.weight, norm.eps)
    assert none is None and out.dtype == dtype
    _close(out, norm._norm(x), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_rms_norm_kernel_with_residual_on_strided_rows(dtype):
    hidden = 40
    norm = _norm(hidden, dtype)
    base = (torch.randn(6, 3 * hidden) * 2).to(dtype)
    x = base[:, hidden : 2 * hidden]  # rows strided like a slice of a fused projection
    res = torch.randn(6, hidden).to(dtype)
    before = (x.clone(), res.clone())
    out, s = triton_fused.rms_norm(x, norm.weight, norm.eps, res)
    torch.testing.assert_close(s, x + res, atol=0, rtol=0)  # the sum is rounded like the reference's
    _close(out, norm._norm(x + res), dtype)
    torch.testing.assert_close((x, res), before)  # inputs untouched


def test_rms_norm_kernel_empty_batch():
    norm = _norm(8, torch.float32)
    out, s = triton_fused.rms_norm(torch.randn(0, 8), norm.weight, norm.eps, torch.randn(0, 8))
    assert out.shape == (0, 8) and s.shape == (0, 8)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("head_dim,rotary_dim,nq,nk", [(16, 16, 4, 1), (32, 16, 7, 7), (64, 64, 3, 2)])
def test_rotary_kernel_in_place_on_qkv_views(dtype, neox, head_dim, rotary_dim, nq, nk):
    rope = RotaryEmbedding(head_dim, rotary_dim=rotary_dim, base=500.0, is_neox_style=neox,
                           scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    t = 9
    qkv = torch.randn(t, (nq + 2 * nk) * head_dim).to(dtype)
    q, k = qkv[:, : nq * head_dim], qkv[:, nq * head_dim : (nq + nk) * head_dim]
    v_before = qkv[:, (nq + nk) * head_dim :].clone()
    positions = torch.tensor([0, 1, 2, 17, 100, 5, 999, 3, 40])
    cos, sin = rope.cos_sin(positions)
    want_q, want_k = rope._rotate(q, cos, sin), rope._rotate(k, cos, sin)
    triton_fused.rotary_inplace(q, k, cos, sin, head_dim=head_dim, is_neox_style=neox)
    _close(q, want_q, dtype)
    _close(k, want_k, dtype)
    torch.testing.assert_close(qkv[:, (nq + nk) * head_dim :], v_before, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("d", [7, 64, 1500])
def test_silu_and_mul_kernel_matches_reference(dtype, d):
    x = (torch.randn(4, 2 * d) * 4).to(dtype)
    _close(triton_fused.silu_and_mul(x), SiluAndMul()(x), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layers_take_the_fused_path_on_cuda(dtype):
    dev = "cuda"
    hidden = 4096
    norm = _norm(hidden, dtype, dev)
    x = (torch.randn(33, hidden, device=dev) * 2).to(dtype)
    res = torch.randn(33, hidden, device=dev).to(dtype)
    out, s = norm(x, res)
    torch.testing.assert_close(s, x + res, atol=0, rtol=0)
    _close(out, norm._norm(x + res), dtype)
    _close(norm(x), norm._norm(x), dtype)
    rope = RotaryEmbedding(128, base=500000.0, max_position_embeddings=8192).to(dev)
    qkv = torch.randn(33, 48 * 128, device=dev).to(dtype)
    q, k = qkv[:, : 32 * 128], qkv[:, 32 * 128 : 40 * 128]
    positions = torch.randint(0, 8192, (33,), device=dev)
    cos, sin = rope.cos_sin(positions)
    want_q, want_k = rope._rotate(q, cos, sin), rope._rotate(k, cos, sin)
    got_q, got_k = rope.rotate(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    _close(got_q, want_q, dtype)
    _close(got_k, want_k, dtype)
    gu = (torch.randn(33, 2 * 14336, device=dev) * 3).to(dtype)
    d = 14336
    _close(SiluAndMul()(gu), torch.nn.functional.silu(gu[:, :d]) * gu[:, d:], dtype)
