"""The fused decode kernels against the unfused layers they replace (RMSNorm, F.linear, RoPE, SiLU-and-mul, the
KV write): CPU interpreter in fp32/fp16 with odd sizes, bias or not, both RoPE styles, a skipped slot; bf16 on
a GPU; whole models with the fused path forced against transformers."""

import pytest
import torch
import torch.nn.functional as F

from blocks.attention import reference
from blocks.layers import triton_decode_fused as fused
from blocks.layers.norm import RMSNorm
from blocks.layers.rotary import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _norm(k, dtype, device):
    norm = RMSNorm(k, eps=1e-5, params_dtype=dtype).to(device)
    norm.weight.data = (1 + 0.3 * torch.randn(k, device=device)).to(dtype)
    return norm


def _unfused_norm(norm, x, residual):
    """The layer's own torch path (no fused kernel): ``(rmsnorm(s), s)``."""
    s = x if residual is None else x + residual
    return norm._norm(s), s


def _inputs(m, k, dtype, device, with_residual):
    x = torch.randn(m, k, device=device).to(dtype)
    res = torch.randn(m, k, device=device).to(dtype) if with_residual else None
    return x, res


def _close(got, want, dtype):
    assert got.dtype == want.dtype and not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,bias,with_residual", [(37, 100, False, True), (50, 96, True, False),
                                                    (70, 130, True, True)])
def test_norm_gated_linear_matches_norm_linear_silu(dtype, n, k, bias, with_residual, device=DEVICE):
    m = 1  # one token: two a launch ran slower than the unfused layers (RESULTS.md)
    torch.manual_seed(n + k)
    norm = _norm(k, dtype, device)
    x, res = _inputs(m, k, dtype, device, with_residual)
    w = (torch.randn(2 * n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(2 * n, device=device).to(dtype) if bias else None
    got, got_res = fused.norm_gated_linear(x, res, norm.weight, norm.eps, w, b)
    y, s = _unfused_norm(norm, x, res)
    h = F.linear(y.float(), w.float(), None if b is None else b.float()).to(dtype)
    d = h.shape[1] // 2
    want = (F.silu(h[:, :d].float()).to(dtype).float() * h[:, d:].float()).to(dtype)
    _close(got, want, dtype)
    assert torch.equal(got_res, s)  # the residual stream: exactly x + residual (or x itself)
    assert (got_res is x) == (res is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,head_dim,k,neox,bias,with_residual,embed", [
    ((4, 2), 16, 100, True, True, True, False),
    ((7, 1), 32, 72, True, False, False, False),
    ((6, 3), 8, 130, False, True, True, False),
    ((4, 2), 16, 100, True, True, False, True),
])
def test_norm_qkv_rope_cache_matches_the_unfused_layers(dtype, heads, head_dim, k, neox, bias, with_residual,
                                                        embed, device=DEVICE):
    """Embed: the first layer, whose x is the embedding row of the token (read in the kernel)."""
    m = 1
    torch.manual_seed(k + head_dim)
    nq, nkv = heads
    rows = (nq + 2 * nkv) * head_dim
    norm = _norm(k, dtype, device)
    x, res = _inputs(m, k, dtype, device, with_residual)
    table = ids = None
    if embed:
        table = torch.randn(37, k, device=device).to(dtype)
        ids = torch.tensor([29], device=device)
        x = table[ids]
    w = (torch.randn(rows, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(rows, device=device).to(dtype) if bias else None
    rope = RotaryEmbedding(head_dim, base=10000.0, is_neox_style=neox).to(device)
    positions = torch.tensor([5 + k], device=device)
    cos, sin = rope.cos_sin(positions)
    block_size, num_blocks = 4, 9
    shape = (num_blocks, block_size, nkv, head_dim)
    kc = torch.full(shape, float("nan"), device=device, dtype=dtype)
    vc = torch.full(shape, float("nan"), device=device, dtype=dtype)
    slots = torch.tensor([-1 if head_dim == 32 else 13 + k % 7], device=device, dtype=torch.int64)
    ref_k, ref_v = kc.clone(), vc.clone()

    q, got_res = fused.norm_qkv_rope_cache(None if embed else x, res, norm.weight, norm.eps, w, b, positions,
                                           rope.inv_freq, kc, vc, slots, num_heads=nq, num_kv_heads=nkv,
                                           head_dim=head_dim, is_neox_style=neox, input_ids=ids, embedding=table,
                                           inputs_ready=not embed)  # both orders of the PDL wait
    y, s = _unfused_norm(norm, x, res)
    qkv = F.linear(y.float(), w.float(), None if b is None else b.float()).to(dtype)
    wq, wk, wv = qkv.split([nq * head_dim, nkv * head_dim, nkv * head_dim], dim=1)
    wq, wk = rope._rotate(wq, cos, sin), rope._rotate(wk, cos, sin)
    reference.reshape_and_cache(wk.view(m, nkv, head_dim), wv.reshape(m, nkv, head_dim), ref_k, ref_v, slots)
    _close(q, wq, dtype)
    assert torch.equal(got_res, s) and (embed or (got_res is x) == (res is None))
    for got_cache, want_cache in ((kc, ref_k), (vc, ref_v)):
        assert torch.equal(got_cache.isnan(), want_cache.isnan())  # written exactly where the reference writes
        written = ~want_cache.isnan()
        _close(got_cache[written], want_cache[written], dtype)


def test_fused_decode_kernels_refuse_bad_shapes():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="1 row"):
        fused.norm_gated_linear(x, None, torch.ones(8), 1e-6, torch.randn(4, 8))
    with pytest.raises(ValueError, match="norm weight"):
        fused.norm_gated_linear(x[:1], None, torch.ones(8, dtype=torch.float16), 1e-6, torch.randn(4, 8))
    kc = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match="rows"):
        fused.norm_qkv_rope_cache(x[:1], None, torch.ones(8), 1e-6, torch.randn(23, 8), None,
                                  torch.zeros(1, dtype=torch.int64), torch.ones(4), kc, kc,
                                  torch.zeros(1, dtype=torch.int64), num_heads=1, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="input_ids"):
        fused.norm_qkv_rope_cache(None, None, torch.ones(8), 1e-6, torch.randn(24, 8), None,
                                  torch.zeros(1, dtype=torch.int64), torch.ones(4), kc, kc,
                                  torch.zeros(1, dtype=torch.int64), num_heads=1, num_kv_heads=1, head_dim=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_decode_kernels_bf16_at_model_shapes():
    """Qwen2.5-0.5B's shapes (hidden 896, 14/2 heads of 64, intermediate 4864) in bf16."""
    test_norm_gated_linear_matches_norm_linear_silu(torch.bfloat16, 4864, 896, False, True, device="cuda")
    for embed in (False, True):
        test_norm_qkv_rope_cache_matches_the_unfused_layers(torch.bfloat16, (14, 2), 64, 896, True, True,
                                                            not embed, embed, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny models run on the CPU: the interpreter's test")
@pytest.mark.parametrize("family,prompt_lens", [("qwen2", (7,)), ("llama-linear", (9,)), ("llama3", (1,)),
                                                ("mistral", (12,))])
def test_fused_decode_layers_match_transformers(family, prompt_lens, tmp_path, monkeypatch):
    """Whole models with the fused path forced on for every one-token step (decode; a 1-token prompt's prefill
    too) on the CPU interpreter: fp32 logits and greedy tokens equal transformers'."""
    from blocks.layers import fused as fused_layers
    from blocks.models.check import check_family

    calls = []
    real = fused.norm_qkv_rope_cache
    monkeypatch.setattr(fused_layers, "use_decode_fusion", lambda num_tokens, hidden_size, device: num_tokens == 1)
    monkeypatch.setattr(fused, "norm_qkv_rope_cache", lambda *a, **k: calls.append(a[0] is None) or real(*a, **k))
    result = check_family(family, workdir=tmp_path, max_new_tokens=6, prompt_lens=prompt_lens,
                          attn_backend="triton", atol=1e-4)
    assert result.passed, result
    assert len(calls) >= 2 * 5  # both layers of every decode step went through the fused kernels
    assert calls.count(True) == len(calls) // 2  # the first layer of each read its embedding row itself
