"""Decode-sized ``x @ W^T`` in Triton: the slab GEMV (:func:`slab_linear`, used by default where it beat
cuBLAS, see :func:`blocks.layers.fused.linear`) and a split-K skinny GEMM (:func:`skinny_linear`, opt-in).

The slab GEMV gives each program whole weight rows held in registers and, launched with PDL on Hopper,
loads them before it waits for the kernel that writes ``x``. Inside Llama-3-8B's decode graph on an H100 it
took the batch-1 step from 6.17 to 5.33 ms (every projection and the LM head; RESULTS.md).

The skinny GEMM:

At batch 1-16 a linear layer is a weight stream: ``W [N, K]`` is read once and the math is free. On an
H100 cuBLAS streams most decode shapes at ~2.9-3.0 TB/s, but it ran Llama-3-8B's o_proj (4096 x 4096) at
1.6 TB/s and adds a split-K reduction kernel to others (``benchmarks/RESULTS.md``). This kernel gives every
program ``BLOCK_N`` weight rows and a ``1 / SPLIT_K`` share of ``K``, so there are enough programs in flight
for any shape; ``SPLIT_K > 1`` writes float32 partials that a second small kernel sums (adding the bias and
casting). Products accumulate in float32 through ``tl.dot`` (``M`` padded to 16 rows).

Opt-in: the linear layers use it on CUDA for ``M <= 16`` rows when the environment sets
``BLOCKS_SKINNY_GEMM=1`` (see :func:`blocks.layers.fused.linear`). Measured on an H100 (RESULTS.md), it is not
faster than cuBLAS on any Llama-3-8B or Qwen2.5-0.5B decode shape, and the engine step runs 6% slower with it. Runs under
``TRITON_INTERPRET=1`` on CPU tensors (fp32/fp16) in the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocks.triton_pdl import pdl_enabled, pdl_launch_dependents, pdl_launch_kwargs, pdl_wait

__all__ = ["skinny_linear", "slab_linear", "slab_fits", "MAX_ROWS", "SLAB_MAX_ROWS"]

MAX_ROWS = 16  # rows of x one launch handles (tl.dot's smallest M)


@triton.jit(do_not_specialize=["M", "stride_os"])  # the row count changes every step
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_os, k_per_split,
                 HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_s * k_per_split
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, k_per_split, BLOCK_K):
        offs_k = k_start + kk + tl.arange(0, BLOCK_K)
        k_ok = (offs_k < K) & (kk + tl.arange(0, BLOCK_K) < k_per_split)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    mask = m_ok[:, None] & n_ok[None, :]
    if DIRECT:  # one split: finish here
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _reduce_kernel(part_ptr, b_ptr, out_ptr, M, N, stride_ps, stride_pm, stride_om, SPLIT_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  block_n: int | None = None, block_k: int = 128, split_k: int | None = None,
                  num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """``x [M, K] @ weight[N, K]^T (+ bias [N])`` -> ``[M, N]`` in ``x.dtype``, for ``M <= MAX_ROWS``.

    ``x`` and ``weight`` need a unit stride along ``K``. Defaults: ``block_n`` 64 rows a program, fewer
    (down to 16) when ``N`` gives too few programs for the SMs; ``split_k`` enough programs for two per
    SM, each still streaming at least 2 ``block_k`` tiles.
    """
    m, k = x.shape
    n, k_w = weight.shape
    if k_w != k or m > MAX_ROWS or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} (<= {MAX_ROWS} rows, unit stride) and weight "
                         f"{tuple(weight.shape)} (unit stride) must share K")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    sms = _num_sms(x.device)
    if block_n is None:
        block_n = 64
        while block_n > 16 and triton.cdiv(n, block_n) < sms:
            block_n //= 2
    n_blocks = triton.cdiv(n, block_n)
    if split_k is None:
        split_k = max(1, min(2 * sms // n_blocks, k // (2 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    has_bias = bias is not None
    b = bias if has_bias else out
    if split_k == 1:
        _gemv_kernel[(n_blocks, 1)](x, weight, b, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), 0,
                                    k_per_split, HAS_BIAS=has_bias, DIRECT=True, BLOCK_M=MAX_ROWS,
                                    BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
        return out
    part = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[(n_blocks, split_k)](x, weight, b, part, m, n, k, x.stride(0), weight.stride(0), part.stride(1),
                                      part.stride(0), k_per_split, HAS_BIAS=False, DIRECT=False, BLOCK_M=MAX_ROWS,
                                      BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    reduce_n = min(1024, triton.next_power_of_2(n))
    _reduce_kernel[(m, triton.cdiv(n, reduce_n))](part, b, out, m, n, part.stride(0), part.stride(1), out.stride(0),
                                                  SPLIT_K=split_k, HAS_BIAS=has_bias, BLOCK_N=reduce_n, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------- slab GEMV
SLAB_MAX_ROWS = 4  # rows of x a slab launch handles (an unrolled loop per row)
SLAB_ELEMS = 16384  # weight elements a program holds in registers at a time (32 KB of bf16)
SLAB_MAX_K = 32768


@triton.jit(do_not_specialize=["M"])
def _slab_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, HAS_BIAS: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_CHUNKS: tl.constexpr,
                 PDL: tl.constexpr = False):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    # the weights do not depend on the kernel before: load the first chunk while it finishes (PDL), then wait
    w0 = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    for m in tl.static_range(ROWS):
        if m < M:
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            acc = tl.sum(w0 * x[None, :], axis=1)
            for c in tl.static_range(1, K_CHUNKS):  # K past the first chunk (a row's later chunks: from L2)
                k = c * BLOCK_K + offs_k
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
                x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
                acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            if HAS_BIAS:
                acc += b
            tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def slab_fits(m: int, k: int) -> bool:
    """Whether :func:`slab_linear` takes ``x [m, k]``."""
    return 1 <= m <= SLAB_MAX_ROWS and k <= SLAB_MAX_K


def slab_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ weight[N, K]^T (+ bias [N])`` -> ``[M, N]`` for decode batches (``M <= SLAB_MAX_ROWS``,
    ``K <= SLAB_MAX_K``): each program owns ``BLOCK_N`` whole weight rows and walks ``K`` in chunks of
    ``SLAB_ELEMS`` (one chunk up to K = 16384; ``BLOCK_N = SLAB_ELEMS / K`` rows). On Hopper it is launched with PDL and loads its first
    chunk before waiting for the kernel that writes ``x``, so the weight stream starts during that kernel's
    tail and the launch, the gap in which cuBLAS spent much of a decode GEMM's time. Products and sums in
    float32 (no split-K, so no second kernel).
    """
    m, k = x.shape
    n, k_w = weight.shape
    if k_w != k or not slab_fits(m, k) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"slab_linear: x {tuple(x.shape)} (1..{SLAB_MAX_ROWS} rows, K <= {SLAB_MAX_K}, unit "
                         f"stride) and weight {tuple(weight.shape)} (unit stride) must share K")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    block_k = min(triton.next_power_of_2(k), SLAB_ELEMS)
    block_n = max(1, min(64, SLAB_ELEMS // block_k, triton.next_power_of_2(n)))
    pdl = pdl_enabled(x.device)
    _slab_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else out, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, ROWS=SLAB_MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        K_CHUNKS=triton.cdiv(k, block_k), PDL=pdl, num_warps=4 if block_n * block_k <= 8192 else 8,
        **pdl_launch_kwargs(pdl))
    return out
