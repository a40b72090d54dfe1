"""Decode-step fusions of a Llama-family layer for one token (batch-1 decode): fewer, longer kernels.

At batch 1 a small model's decode step is a chain of dependent kernels of 1-7 us each (Qwen2.5-0.5B: a
dozen a layer, RMSNorm, rotary, the KV write and SiLU-and-mul among them; ``benchmarks/RESULTS.md``). Two
kernels here fold those into the projections, in the slab-GEMV form of
:mod:`blocks.layers.triton_gemv` (each program holds whole weight rows in registers and, launched with PDL,
loads them before it waits for the kernel that writes its input):

* :func:`norm_gated_linear`: ``s = x + residual``, ``y = rmsnorm(s) * norm_weight``, then the gate and up
  rows of ``gate_up`` (a program owns matching gate and up rows) and ``silu(gate) * up``. Replaces the
  RMSNorm, the gate_up GEMM and the SiLU-and-mul kernels.
* :func:`norm_qkv_rope_cache`: the same norm, then the QKV projection (bias included), RoPE on the query
  and key heads (a program owns pairs of rotated rows and computes their angles from the position) and the
  KV write into the paged cache by ``slot_mapping`` (``-1`` skips). Replaces the RMSNorm, QKV GEMM, rotary
  and KV-write kernels, and for the first layer the embedding lookup; returns the rotated queries.

Every program recomputes the norm of the token's row (``K`` elements, from L2); program 0 writes the new
residual stream. The roundings are those of the unfused layers (:class:`~blocks.layers.norm.RMSNorm`,
``F.linear``, :class:`~blocks.layers.rotary.RotaryEmbedding`, :class:`~blocks.layers.activation.SiluAndMul`):
each rounds to the activation dtype where they do; only the dot products' summation order differs from
cuBLAS. Runs under ``TRITON_INTERPRET=1`` on CPU tensors (fp32/fp16) in the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocks.layers.fused import DECODE_FUSION_MAX_K as FUSED_MAX_K
from blocks.layers.fused import DECODE_FUSION_MAX_ROWS as FUSED_MAX_ROWS
from blocks.triton_pdl import pdl_enabled, pdl_launch_dependents, pdl_launch_kwargs, pdl_wait

__all__ = ["norm_gated_linear", "norm_qkv_rope_cache", "FUSED_MAX_ROWS", "FUSED_MAX_K", "fits"]

ELEMS = 16384  # weight elements a program holds (as the slab GEMV); benchmarks/graph_variants.py tunes these
WARPS: int | None = None  # warps a program (None: 4 up to 8192 elements, else 8)


def _warps(elems: int) -> int:
    return WARPS or (4 if elems <= 8192 else 8)


def fits(num_tokens: int, hidden_size: int) -> bool:
    """Whether the fused decode kernels take ``num_tokens`` rows of ``hidden_size``."""
    return 1 <= num_tokens <= FUSED_MAX_ROWS and hidden_size <= FUSED_MAX_K


@triton.jit
def _norm_weight(nw_ptr, K, BLOCK_K: tl.constexpr):
    """The RMSNorm weight ``[BLOCK_K]`` as float32 (a constant: loaded before a kernel's PDL wait)."""
    offs = tl.arange(0, BLOCK_K)
    return tl.load(nw_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)


@triton.jit
def _normed_row(x_ptr, res_ptr, res_out_ptr, w, K, eps, pid, HAS_RES: tl.constexpr, STORE_X: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """``rmsnorm(x + residual) * w`` of the token (``w`` from :func:`_norm_weight`) as float32 values of the
    activation dtype; program 0 (``pid``) writes the sum (``STORE_X``: ``x`` itself) to ``res_out``, the new
    residual stream."""
    offs = tl.arange(0, BLOCK_K)
    ok = offs < K
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + offs, mask=ok, other=0.0)  # rounded to the dtype, as torch
    if HAS_RES or STORE_X:
        tl.store(res_out_ptr + offs, x, mask=ok & (offs * 0 + pid == 0))
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)
    y = (xf * inv).to(x.dtype).to(tl.float32)
    return (w * y).to(x.dtype).to(tl.float32)


@triton.jit
def _load_row_pair(w_ptr, b_ptr, rows_a, rows_b, row_ok, K, stride_wn, HAS_BIAS: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Weight rows ``rows_a`` and ``rows_b`` (``[R, BLOCK_K]`` float32, masked by ``row_ok``) and their biases
    (zeros without one): loaded before a kernel's PDL wait."""
    offs_k = tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (offs_k < K)[None, :]
    wa = tl.load(w_ptr + rows_a.to(tl.int64)[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    wb = tl.load(w_ptr + rows_b.to(tl.int64)[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        ba = tl.load(b_ptr + rows_a, mask=row_ok, other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + rows_b, mask=row_ok, other=0.0).to(tl.float32)
    else:
        ba = tl.zeros(rows_a.shape, dtype=tl.float32)
        bb = tl.zeros(rows_b.shape, dtype=tl.float32)
    return wa.to(tl.float32), wb.to(tl.float32), ba, bb


@triton.jit
def _dot_row_pair(wa, wb, ba, bb, y, out_ptr, HAS_BIAS: tl.constexpr):
    """``(wa @ y + ba, wb @ y + bb)`` (no bias without HAS_BIAS), each rounded to the activation dtype
    (``out_ptr``'s, as the projection's output), as float32."""
    dt = out_ptr.dtype.element_ty
    a = tl.sum(wa * y[None, :], axis=1)
    b = tl.sum(wb * y[None, :], axis=1)
    if HAS_BIAS:
        a += ba
        b += bb
    return a.to(dt).to(tl.float32), b.to(dt).to(tl.float32)


@triton.jit
def _norm_gated_kernel(x_ptr, res_ptr, res_out_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, N, K, eps, stride_wn,
                       HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # weights first (they do not depend on the kernel before), then wait for x; gate row j pairs with up row N + j
    wg, wu, bg, bu = _load_row_pair(w_ptr, b_ptr, offs_n, offs_n + N, n_ok, K, stride_wn, HAS_BIAS, BLOCK_K)
    nw = _norm_weight(nw_ptr, K, BLOCK_K)
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    y = _normed_row(x_ptr, res_ptr, res_out_ptr, nw, K, eps, pid, HAS_RES, False, BLOCK_K)
    dt = out_ptr.dtype.element_ty
    g, u = _dot_row_pair(wg, wu, bg, bu, y, out_ptr, HAS_BIAS)  # the gate_up output, rounded
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # silu, rounded like F.silu's output
    tl.store(out_ptr + offs_n, (act * u).to(dt), mask=n_ok)


@triton.jit
def _rope_and_slot(pos_ptr, inv_freq_ptr, slot_ptr, i, dt: tl.constexpr):
    """cos and sin of rotation pairs ``i`` at the token's position (``RotaryEmbedding.cos_sin``'s float32
    angle, each cast to the activation dtype ``dt``) and the token's cache slot."""
    angle = tl.load(pos_ptr).to(tl.float32) * tl.load(inv_freq_ptr + i)
    return tl.cos(angle).to(dt).to(tl.float32), tl.sin(angle).to(dt).to(tl.float32), tl.load(slot_ptr)


@triton.jit
def _norm_qkv_kernel(x_ptr, ids_ptr, stride_e, res_ptr, res_out_ptr, nw_ptr, w_ptr, b_ptr, q_ptr, kc_ptr, vc_ptr,
                     slot_ptr, pos_ptr, inv_freq_ptr, K, eps, stride_wn, stride_kb, stride_ks, stride_kh, stride_vb,
                     stride_vs, stride_vh,
                     NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     PAIRS: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_NEOX: tl.constexpr, HAS_RES: tl.constexpr,
                     EMBED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, EARLY: tl.constexpr,
                     PDL: tl.constexpr = False):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    head = pid // (HALF // PAIRS)  # over [query heads | key heads | value heads]
    i = (pid % (HALF // PAIRS)) * PAIRS + tl.arange(0, PAIRS)  # rotation pairs of the head this program owns
    if IS_NEOX:  # pair (d, d + HALF)
        da = i
        db = i + HALF
    else:  # pair (2 d, 2 d + 1)
        da = 2 * i
        db = 2 * i + 1
    row_a = head * HEAD_DIM + da
    row_b = head * HEAD_DIM + db
    wa, wb, ba, bb = _load_row_pair(w_ptr, b_ptr, row_a, row_b, i < HALF, K, stride_wn, HAS_BIAS, BLOCK_K)
    nw = _norm_weight(nw_ptr, K, BLOCK_K)
    dt = q_ptr.dtype.element_ty
    if EARLY:  # the position and slot were not written by the kernel before: cos/sin before the wait too
        c, s, slot = _rope_and_slot(pos_ptr, inv_freq_ptr, slot_ptr, i, dt)
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    if not EARLY:
        c, s, slot = _rope_and_slot(pos_ptr, inv_freq_ptr, slot_ptr, i, dt)
    if EMBED:  # x is the embedding table: the token's row (its id may come from the step's in-flight gather)
        x_ptr += tl.load(ids_ptr) * stride_e
    y = _normed_row(x_ptr, res_ptr, res_out_ptr, nw, K, eps, pid, HAS_RES, EMBED, BLOCK_K)
    a, b = _dot_row_pair(wa, wb, ba, bb, y, q_ptr, HAS_BIAS)  # the projection's output, rounded
    if head < NUM_Q_HEADS + NUM_KV_HEADS:  # queries and keys rotate
        oa = ((a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)).to(dt)
        ob = ((b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)).to(dt)
    else:
        oa = a.to(dt)
        ob = b.to(dt)
    if head < NUM_Q_HEADS:
        tl.store(q_ptr + row_a, oa)
        tl.store(q_ptr + row_b, ob)
    else:
        blk = tl.maximum(slot, 0) // BLOCK_SIZE
        off = tl.maximum(slot, 0) % BLOCK_SIZE
        if head < NUM_Q_HEADS + NUM_KV_HEADS:
            base = kc_ptr + blk * stride_kb + off * stride_ks + (head - NUM_Q_HEADS) * stride_kh
        else:
            base = vc_ptr + blk * stride_vb + off * stride_vs + (head - NUM_Q_HEADS - NUM_KV_HEADS) * stride_vh
        keep = (i * 0 + slot) >= 0
        tl.store(base + da, oa, mask=keep)
        tl.store(base + db, ob, mask=keep)


def _check_rows(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, weight: torch.Tensor):
    m, k = x.shape
    if not fits(m, k) or x.stride(1) != 1 or weight.stride(1) != 1 or weight.shape[1] != k:
        raise ValueError(f"fused decode layer: x {tuple(x.shape)} ({FUSED_MAX_ROWS} row, K <= {FUSED_MAX_K}, "
                         f"unit stride) and weight {tuple(weight.shape)} (unit stride) must share K")
    if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype or weight.dtype != x.dtype:
        raise ValueError(f"fused decode layer: norm weight {tuple(norm_weight.shape)} {norm_weight.dtype} and "
                         f"weight {weight.dtype} must match x [.., {k}] {x.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError(f"fused decode layer: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")


def _residual_args(x, residual):
    """(residual input, residual output) tensors: a new stream ``x + residual``, or ``x`` itself."""
    if residual is None:
        return x, x
    return residual, torch.empty_like(x)


def norm_gated_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (or ``x``), ``y = rmsnorm(s, eps) * norm_weight``, ``h = y @ weight^T (+ bias)``,
    then ``silu(h[:, :N]) * h[:, N:]``.

    Args:
        x, residual: ``[1, K]`` activations (``K <= FUSED_MAX_K``; unit last stride).
        norm_weight: ``[K]``. weight: ``[2 N, K]`` gate rows then up rows; bias ``[2 N]`` or ``None``.

    Returns:
        ``([1, N], s [1, K])``: the MLP's hidden activations and the new residual stream (``x`` when
        ``residual`` is ``None``).
    """
    _check_rows(x, residual, norm_weight, weight)
    m, k = x.shape
    n = weight.shape[0] // 2
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_in, res_out = _residual_args(x, residual)
    block_k = triton.next_power_of_2(k)
    block_n = max(1, min(64, ELEMS // (2 * block_k), triton.next_power_of_2(n)))
    pdl = pdl_enabled(x.device)
    _norm_gated_kernel[(triton.cdiv(n, block_n),)](
        x, res_in, res_out, norm_weight, weight, bias if bias is not None else weight, out, n, k, eps,
        weight.stride(0), HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, PDL=pdl, num_warps=_warps(2 * block_n * block_k), **pdl_launch_kwargs(pdl))
    return out, res_out


def norm_qkv_rope_cache(
    x: torch.Tensor | None, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor, inv_freq: torch.Tensor,
    key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
    num_heads: int, num_kv_heads: int, head_dim: int, is_neox_style: bool = True,
    input_ids: torch.Tensor | None = None, embedding: torch.Tensor | None = None, inputs_ready: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm, QKV projection, RoPE and the KV write of one decode token in one launch.

    Args:
        x, residual, norm_weight, eps: as :func:`norm_gated_linear`. ``x`` may be ``None`` with ``input_ids``
            ``[>= 1]`` int64 and ``embedding [vocab, K]``: the token's embedding row is read here (the first
            layer), and it is also the returned residual stream.
        weight: ``[(num_heads + 2 num_kv_heads) head_dim, K]`` rows ``[q | k | v]``; bias likewise or ``None``.
        positions: ``[>= 1]`` int64, the token's position first; inv_freq: ``[head_dim / 2]`` float32 (the rotary
            module's; the whole head rotates, at angle ``float(position) * inv_freq`` as
            :meth:`RotaryEmbedding.cos_sin` computes it).
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` in ``x``'s dtype.
        slot_mapping: ``[>= 1]`` int64, the token's cache slot first (``-1``: not written).
        inputs_ready: ``positions`` and ``slot_mapping`` were not written by the kernel launched just before
            this one, so on Hopper (PDL) they and the rotary angles are read while that kernel still runs. A
            model's layers after the first qualify (the kernel before is the previous layer's down
            projection); with False they are read after the wait, like ``x``. It took about 40 us off
            Qwen2.5-0.5B's batch-1 decode graph on an H100 (811 -> 772 us; RESULTS.md).

    Returns:
        ``(q [1, num_heads * head_dim], s [1, K])``: the rotated queries and the new residual stream.
    """
    embed = x is None
    if embed:
        if input_ids is None or embedding is None or embedding.stride(1) != 1:
            raise ValueError("norm_qkv_rope_cache: x=None needs input_ids and an embedding table with unit stride")
        x = embedding[:1]  # shape and dtype checks only: the kernel reads the row of input_ids[0]
    _check_rows(x, residual, norm_weight, weight)
    m, k = x.shape
    half = head_dim // 2
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    if (weight.shape[0] != rows or head_dim % 2 or inv_freq.shape != (half,) or inv_freq.dtype != torch.float32
            or positions.shape[0] < m):
        raise ValueError(f"norm_qkv_rope_cache: weight {tuple(weight.shape)} needs {rows} rows, inv_freq "
                         f"{tuple(inv_freq.shape)} {inv_freq.dtype} [{half}] float32, positions >= {m}")
    if (key_cache.dtype != x.dtype or value_cache.dtype != x.dtype or key_cache.shape[2:] != (num_kv_heads, head_dim)
            or key_cache.stride(3) != 1 or value_cache.stride(3) != 1 or slot_mapping.shape[0] < m):
        raise ValueError(f"norm_qkv_rope_cache: caches {tuple(key_cache.shape)} {key_cache.dtype} must be "
                         f"[blocks, block_size, {num_kv_heads}, {head_dim}] {x.dtype}, slot_mapping >= {m} tokens")
    q = torch.empty((m, num_heads * head_dim), dtype=x.dtype, device=x.device)
    if embed:
        res_in, res_out = x, torch.empty_like(x)
    else:
        res_in, res_out = _residual_args(x, residual)
    block_k = triton.next_power_of_2(k)
    pairs = max(1, min(triton.next_power_of_2(half), ELEMS // (2 * block_k)))
    while half % pairs:
        pairs //= 2
    pdl = pdl_enabled(x.device)
    grid = ((num_heads + 2 * num_kv_heads) * (half // pairs),)
    _norm_qkv_kernel[grid](
        embedding if embed else x, input_ids if embed else slot_mapping, embedding.stride(0) if embed else 0,
        res_in, res_out, norm_weight, weight, bias if bias is not None else weight, q, key_cache, value_cache,
        slot_mapping, positions, inv_freq, k, eps, weight.stride(0), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAIRS=pairs,
        BLOCK_SIZE=key_cache.shape[1], IS_NEOX=is_neox_style, HAS_RES=residual is not None, EMBED=embed,
        HAS_BIAS=bias is not None, BLOCK_K=block_k, EARLY=bool(inputs_ready), PDL=pdl,
        num_warps=_warps(2 * pairs * block_k), **pdl_launch_kwargs(pdl))
    return q, res_out
