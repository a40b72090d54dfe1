"""Shared pieces of the attention benchmarks: shapes, inputs, timing with an L2 flush, the peers.

Timing: :func:`benchmarks.cuda_timing.time_cuda` (cold L2, device time, median). Bandwidth counts the bytes of K and V
the attention must read (each context token's K and V rows of every KV head, once); TFLOP/s counts
``4 * heads * head_dim`` per (query, key) pair that the causal mask keeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from benchmarks.cuda_timing import time_cuda
from blocks.attention.metadata import plan_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DECODE_SHAPES = [(64, 4096), (256, 1024), (8, 32768), (1, 4096), (1, 32768)]
PREFILL_LEN = 4096
MIXED = {"prefill_chunks": 4, "chunk": 512, "prefix": 1536, "decode_rows": 60, "decode_ctx": 2048}

@dataclass
class PagedInputs:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    metadata: object
    kv_bytes: int
    flops: float
    sdpa: object  # callable running the contiguous-cache peer


def _paged_cache(seq_lens, *, cache_dtype=DTYPE):
    """Random paged cache holding ``seq_lens`` tokens per sequence, block ids shuffled."""
    blocks_per = [-(-s // BLOCK_SIZE) for s in seq_lens]
    ids = list(range(1, sum(blocks_per) + 1))
    random.Random(0).shuffle(ids)
    tables, at = [], 0
    for n in blocks_per:
        tables.append(ids[at:at + n])
        at += n
    shape = (sum(blocks_per) + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kc = torch.randn(shape, device="cuda", dtype=DTYPE).to(cache_dtype)
    vc = torch.randn(shape, device="cuda", dtype=DTYPE).to(cache_dtype)
    return kc, vc, tables


def _contiguous(kc, vc, tables, seq_lens):
    """Per-sequence contiguous [1, kv_heads, len, D] copies for the SDPA peer."""
    ks, vs = [], []
    for t, s in zip(tables, seq_lens):
        idx = torch.tensor(t, device="cuda")
        ks.append(kc[idx].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:s].transpose(0, 1).contiguous())
        vs.append(vc[idx].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:s].transpose(0, 1).contiguous())
    return ks, vs


def _sdpa(q, k, v, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)


def decode_inputs(batch: int, ctx: int, *, cache_dtype=DTYPE) -> PagedInputs:
    kc, vc, tables = _paged_cache([ctx] * batch, cache_dtype=cache_dtype)
    md = plan_attention([1] * batch, [ctx] * batch, tables, BLOCK_SIZE, device="cuda")
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * kc.element_size()
    flops = 4.0 * batch * NUM_HEADS * ctx * HEAD_DIM
    sdpa = None
    if cache_dtype == DTYPE:
        ks, vs = _contiguous(kc, vc, tables, [ctx] * batch)
        k, v = torch.stack(ks), torch.stack(vs)  # [B, Hkv, ctx, D]
        del ks, vs
        qd = q.view(batch, NUM_HEADS, 1, HEAD_DIM)
        sdpa = lambda: _sdpa(qd, k, v)
    return PagedInputs(q, kc, vc, md, kv_bytes, flops, sdpa)


def prefill_inputs(length: int = PREFILL_LEN) -> PagedInputs:
    kc, vc, tables = _paged_cache([length])
    md = plan_attention([length], [length], tables, BLOCK_SIZE, device="cuda")
    q = torch.randn(length, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    ks, vs = _contiguous(kc, vc, tables, [length])
    k, v = ks[0][None], vs[0][None]
    qs = q.transpose(0, 1)[None].contiguous()
    flops = 4.0 * NUM_HEADS * HEAD_DIM * length * (length + 1) / 2
    kv_bytes = 2 * length * NUM_KV_HEADS * HEAD_DIM * 2
    return PagedInputs(q, kc, vc, md, kv_bytes, flops, lambda: _sdpa(qs, k, v, is_causal=True))


def mixed_inputs() -> PagedInputs:
    m = MIXED
    n_p, chunk, prefix, n_d, dctx = m["prefill_chunks"], m["chunk"], m["prefix"], m["decode_rows"], m["decode_ctx"]
    qlens = [1] * n_d + [chunk] * n_p  # decode rows first, as the engine orders a step
    slens = [dctx] * n_d + [prefix + chunk] * n_p
    kc, vc, tables = _paged_cache(slens)
    md = plan_attention(qlens, slens, tables, BLOCK_SIZE, device="cuda")
    q = torch.randn(sum(qlens), NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    kv_bytes = 2 * sum(slens) * NUM_KV_HEADS * HEAD_DIM * 2
    pairs = n_p * NUM_HEADS * (chunk * prefix + chunk * (chunk + 1) / 2) + n_d * NUM_HEADS * dctx
    flops = 4.0 * HEAD_DIM * pairs
    ks, vs = _contiguous(kc, vc, tables, slens)
    kd, vd = torch.stack(ks[:n_d]), torch.stack(vs[:n_d])
    kp, vp = torch.stack(ks[n_d:]), torch.stack(vs[n_d:])
    qd = q[:n_d].view(n_d, NUM_HEADS, 1, HEAD_DIM)
    qp = q[n_d:].view(n_p, chunk, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
    pos_q = torch.arange(prefix, prefix + chunk, device="cuda")[:, None]
    mask = torch.arange(prefix + chunk, device="cuda")[None, :] <= pos_q  # causal, aligned bottom-right

    def sdpa():
        # a bottom-right causal mask is not a flash-backend mask: SDPA picks another backend here
        torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)
        _sdpa(qd, kd, vd)

    return PagedInputs(q, kc, vc, md, kv_bytes, flops, sdpa)


@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def stream_read_ceiling(nbytes: int = 2 * 2**30) -> float:
    """Bytes/s of a streaming-read kernel over ``nbytes`` of bf16 (one float written per program)."""
    n = nbytes // 2
    x = torch.randn(n, device="cuda", dtype=DTYPE)
    block, iters = 4096, 16
    grid = triton.cdiv(n, block * iters)
    out = torch.empty(grid, device="cuda", dtype=torch.float32)
    t = time_cuda(lambda: _stream_read_kernel[(grid,)](x, out, n, BLOCK=block, ITERS=iters, num_warps=8))
    return nbytes / t
