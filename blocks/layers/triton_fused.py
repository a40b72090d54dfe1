"""Fused Triton kernels for the per-token layers of a decoder: RMSNorm (+ residual add), rotary, SiLU-and-mul.

In eager PyTorch each of these layers is 4-10 elementwise launches (casts, ``pow``, ``mean``,
``rsqrt``, slices, ``cat``); at decode batch sizes each launch moves a few KB, so a Llama-3-8B decode
step spent ~2 ms of its ~8.5 ms in them on an H100 (see ``benchmarks/RESULTS.md``). One kernel per
layer call here. Each kernel reproduces its torch reference's roundings (sums, products and casts
rounded to the input dtype where the reference rounds), so bf16 results equal the reference up to
the last-bit differences of ``rsqrt`` / ``exp``.

The layers (:class:`~blocks.layers.norm.RMSNorm`, :class:`~blocks.layers.rotary.RotaryEmbedding`,
:class:`~blocks.layers.activation.SiluAndMul`) call these on CUDA tensors; on the CPU they run under
``TRITON_INTERPRET=1`` in the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocks.triton_pdl import pdl_enabled, pdl_enter, pdl_launch_kwargs

__all__ = ["rms_norm", "rotary_inplace", "silu_and_mul"]


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro,
                     n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        s = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)  # rounded to the input dtype
        tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
        x = s
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * inv).to(x.dtype).to(tl.float32)  # the reference casts back before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x [T, H]`` (rows may be strided, last dim contiguous), ``weight [H]``; with ``residual [T, H]``
    first ``s = x + residual`` (input dtype). Returns ``(rmsnorm(s) * weight, s or None)``, new tensors;
    the output dtype is ``torch.promote_types(x.dtype, weight.dtype)`` like the reference."""
    t, h = x.shape
    out = torch.empty((t, h), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty((t, h), dtype=x.dtype, device=x.device) if residual is not None else None
    if t:
        r = residual if residual is not None else x
        ro = res_out if res_out is not None else out
        pdl = pdl_enabled(x.device)
        _rms_norm_kernel[(t,)](x, r, weight, out, ro, x.stride(0), r.stride(0), out.stride(0), ro.stride(0),
                               h, eps, HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(h), PDL=pdl,
                               num_warps=4 if h <= 4096 else 8, **pdl_launch_kwargs(pdl))
    return out, res_out


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_kt, stride_ct, n_q_heads, n_k_heads,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                   IS_NEOX: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0: query heads, 1: key heads
    i = tl.arange(0, BLOCK_R)
    rmask = i < HALF
    c = tl.load(cos_ptr + tok * stride_ct + i, mask=rmask, other=0.0)
    s = tl.load(sin_ptr + tok * stride_ct + i, mask=rmask, other=0.0)
    h = tl.arange(0, BLOCK_H)
    if which == 0:
        base = q_ptr + tok * stride_qt
        n_heads = n_q_heads
    else:
        base = k_ptr + tok * stride_kt
        n_heads = n_k_heads
    mask = (h[:, None] < n_heads) & rmask[None, :]
    if IS_NEOX:
        off1 = h[:, None] * HEAD_DIM + i[None, :]
        off2 = off1 + HALF
    else:
        off1 = h[:, None] * HEAD_DIM + 2 * i[None, :]
        off2 = off1 + 1
    x1 = tl.load(base + off1, mask=mask, other=0.0)
    x2 = tl.load(base + off2, mask=mask, other=0.0)
    dt = x1.dtype
    # the reference casts cos/sin to the input dtype and rounds every product and sum to it
    c = c.to(dt).to(tl.float32)[None, :]
    s = s.to(dt).to(tl.float32)[None, :]
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    o1 = ((a1 * c).to(dt).to(tl.float32) - (a2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)
    tl.store(base + off1, o1, mask=mask)
    tl.store(base + off2, o2, mask=mask)


def rotary_inplace(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                   head_dim: int, is_neox_style: bool) -> None:
    """Rotate ``query [T, Hq * head_dim]`` and ``key [T, Hk * head_dim]`` in place (rows may be strided
    views of a fused QKV output; each row's heads contiguous) by ``cos``/``sin [T, rotary_dim / 2]``
    float32; dims past ``rotary_dim`` of each head are left untouched."""
    t = query.shape[0]
    if t == 0:
        return
    half = cos.shape[1]
    nq, nk = query.shape[1] // head_dim, key.shape[1] // head_dim
    if query.stride(1) != 1 or key.stride(1) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rotary_inplace needs contiguous head rows and cos/sin of the same layout")
    pdl = pdl_enabled(query.device)
    _rotary_kernel[(t, 2)](query, key, cos, sin, query.stride(0), key.stride(0), cos.stride(0), nq, nk,
                           HEAD_DIM=head_dim, HALF=half, BLOCK_H=triton.next_power_of_2(max(nq, nk)),
                           BLOCK_R=triton.next_power_of_2(half), IS_NEOX=is_neox_style, PDL=pdl, num_warps=4,
                           **pdl_launch_kwargs(pdl))


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # silu, rounded like F.silu's output
    tl.store(out_ptr + row * stride_o + cols, (act * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [T, 2 d]`` (last dim contiguous) -> ``silu(x[:, :d]) * x[:, d:]`` as a new ``[T, d]`` tensor."""
    t, two_d = x.shape
    d = two_d // 2
    out = torch.empty((t, d), dtype=x.dtype, device=x.device)
    if t:
        block = min(1024, triton.next_power_of_2(d))
        pdl = pdl_enabled(x.device)
        _silu_and_mul_kernel[(t, triton.cdiv(d, block))](x, out, x.stride(0), out.stride(0), d, BLOCK=block,
                                                         PDL=pdl, num_warps=4, **pdl_launch_kwargs(pdl))
    return out
