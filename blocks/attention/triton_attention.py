"""Triton paged attention: one kernel for mixed prefill-chunk / decode batches, plus split-KV.

Kernels (launched by :func:`paged_attention` and by the Triton backend):

* ``paged_attn_kernel``: each program owns ``BLOCK_Q`` query tokens of one sequence and the
  ``GROUP = num_heads // num_kv_heads`` query heads that share one KV head, packed into a
  ``BLOCK_M`` row tile (row ``r`` is token ``r // GROUP``, head ``r % GROUP``), so every K/V tile
  loaded through ``block_table`` serves all heads of the group. Online softmax in float32
  (base-2 exponentials), causal mask only on the tiles that need it, optional sliding window and
  soft-capping, FP8 (e4m3) K/V dequantised by per-tensor scales (``k_scale`` folded into the
  scores, ``v_scale`` into the output). Block ids are widened to int64 before they multiply a
  stride, so caches past 2**31 elements are addressed correctly.
* With ``USE_SPLIT`` the same kernel gets a third grid axis that cuts each sequence's KV range
  into ``num_splits`` chunks (flash-decoding) and writes float32 partial outputs with their
  log-sum-exp; ``merge_splits_kernel`` combines them.

Programs find their sequence without any host data: sequence ``i`` owns the program ids
``[query_start_loc[i] // BLOCK_Q + i, ...)`` (``query_start_loc[i]`` when ``BLOCK_Q == 1``), and a
program binary-searches ``query_start_loc`` (a launch of one-token decode rows, ``ONE_TOKEN``, skips the
search: program ``i`` is sequence ``i``; the search's chain of dependent loads was most of a decode
program's start-up, paid once per split). A launch may cover only the sequences
``[seq_base, seq_base + num_seqs)`` (token ids then count from that part's first token): a mixed
batch launches its leading decode rows with one-token tiles and its prefill chunks with wide tiles. Tokens beyond ``query_start_loc[-1]`` (CUDA-graph
padding) form a virtual last sequence of length 0; rows with ``seq_len == 0`` are written as zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

from blocks.triton_pdl import pdl_launch_dependents, pdl_wait

__all__ = ["paged_attn_kernel", "merge_splits_kernel", "kv_offsets", "walk_table_kernel"]

LOG2E = 1.4426950408889634


@triton.jit
def kv_offsets(block_table_row_ptr, pos, stride_b, stride_s, head_off, BLOCK_SIZE: tl.constexpr, mask,
               ALIGN: tl.constexpr = 1):
    """Element offsets (int64) of the cache rows at token positions ``pos`` of one sequence.

    ``ALIGN`` (a power of two dividing every stride and ``head_off``) tells the compiler the rows
    start on aligned elements, so the row loads become 16-byte vector loads.
    """
    if mask is None:
        block_ids = tl.load(block_table_row_ptr + pos // BLOCK_SIZE)
    else:
        block_ids = tl.load(block_table_row_ptr + pos // BLOCK_SIZE, mask=mask, other=0)
    off = block_ids.to(tl.int64) * stride_b + (pos % BLOCK_SIZE).to(tl.int64) * stride_s + head_off
    return tl.multiple_of(off, ALIGN)


@triton.jit
def _attn_tile(
    acc, m_i, l_i, q, k_ptr, v_ptr, bt_row_ptr, start, q_pos, seq_len, k_head_off, v_head_off, d_offs,
    qk_scale, soft_cap, sliding_window,
    stride_kb, stride_ks, stride_vb, stride_vs,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
):
    n = start + tl.arange(0, BLOCK_N)
    d_ok = d_offs[None, :] < HEAD_DIM
    if MASKED:
        n_ok = n < seq_len
        k_off = kv_offsets(bt_row_ptr, n, stride_kb, stride_ks, k_head_off, BLOCK_SIZE, n_ok, ALIGN)
        v_off = kv_offsets(bt_row_ptr, n, stride_vb, stride_vs, v_head_off, BLOCK_SIZE, n_ok, ALIGN)
        k = tl.load(k_ptr + k_off[:, None] + d_offs[None, :], mask=n_ok[:, None] & d_ok, other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + d_offs[None, :], mask=n_ok[:, None] & d_ok, other=0.0)
    else:
        k_off = kv_offsets(bt_row_ptr, n, stride_kb, stride_ks, k_head_off, BLOCK_SIZE, None, ALIGN)
        v_off = kv_offsets(bt_row_ptr, n, stride_vb, stride_vs, v_head_off, BLOCK_SIZE, None, ALIGN)
        if HEAD_DIM == HEAD_DIM_PAD:
            k = tl.load(k_ptr + k_off[:, None] + d_offs[None, :])
            v = tl.load(v_ptr + v_off[:, None] + d_offs[None, :])
        else:
            k = tl.load(k_ptr + k_off[:, None] + d_offs[None, :], mask=d_ok, other=0.0)
            v = tl.load(v_ptr + v_off[:, None] + d_offs[None, :], mask=d_ok, other=0.0)
    if KV_FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if USE_SOFTCAP:
        # c * tanh(x / c) with tanh written through exp (no NaN at large |x|)
        x = s * (qk_scale / soft_cap)
        s = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * 1.4426950408889634
    else:
        s = s * (qk_scale * 1.4426950408889634)
    if MASKED:
        ok = (n[None, :] <= q_pos[:, None]) & (n[None, :] < seq_len)
        if USE_WINDOW:
            ok &= (q_pos[:, None] - n[None, :]) < sliding_window
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# ints that change every step (counts, the block table's width, the split workspace's per-split strides)
# are not specialized (== 1, % 16): each new combination would compile a new variant mid-run (about a
# second each on a serving engine)
@triton.jit(do_not_specialize=["seq_base", "num_seqs", "num_tokens", "num_programs_q", "stride_bt", "stride_ps",
                              "stride_ls"])
def paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_table_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, soft_cap, sliding_window, seq_base, num_seqs, num_tokens, num_programs_q,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_SPLIT: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, ONE_TOKEN: tl.constexpr = False, PDL: tl.constexpr = False,
    HEADS_FASTEST: tl.constexpr = False,
):
    # heaviest (latest) query blocks first; with HEADS_FASTEST the KV heads of one query block are neighbours in
    # launch order, so programs that run together read the same cache blocks (a decode launch: 64 x 4096 on an H100
    # 371 -> 369 us, 256 x 1024 374 -> 371 us; RESULTS.md)
    if HEADS_FASTEST:
        pid = num_programs_q - 1 - tl.program_id(1)
        kv_head = tl.program_id(0)
    else:
        pid = num_programs_q - 1 - tl.program_id(0)
        kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # this launch covers sequences [seq_base, seq_base + num_seqs): a part of a mixed batch (decode rows
    # and prefill chunks get their own launches and tiles); its tokens start at tok_base
    query_start_loc_ptr += seq_base
    seq_lens_ptr += seq_base
    block_table_ptr += seq_base.to(tl.int64) * stride_bt
    tok_base = tl.load(query_start_loc_ptr)

    if ONE_TOKEN:  # decode rows, one query token each: program i is sequence i (past them, the padding)
        seq = tl.minimum(pid, num_seqs)
        q_start = tok_base + seq
        first_prog = seq
    else:
        # binary search: largest i in [0, num_seqs] with first_program(i) <= pid
        lo = pid * 0
        hi = num_seqs + pid * 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if BLOCK_Q == 1:
                first = tl.load(query_start_loc_ptr + mid) - tok_base
            else:
                first = (tl.load(query_start_loc_ptr + mid) - tok_base) // BLOCK_Q + mid
            if first <= pid:
                lo = mid
            else:
                hi = mid - 1
        seq = lo
        q_start = tl.load(query_start_loc_ptr + seq)
        if BLOCK_Q == 1:
            first_prog = q_start - tok_base
        else:
            first_prog = (q_start - tok_base) // BLOCK_Q + seq
    if seq < num_seqs:
        if ONE_TOKEN:
            q_end = q_start + 1
        else:
            q_end = tl.load(query_start_loc_ptr + seq + 1)
        seq_len = tl.load(seq_lens_ptr + seq)
    else:
        q_end = num_tokens + pid * 0
        seq_len = pid * 0
    q_len = q_end - q_start
    q_block = pid - first_prog
    if q_block * BLOCK_Q >= q_len:
        return

    rows = tl.arange(0, BLOCK_M)
    tok_local = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = ((rows // GROUP) < BLOCK_Q) & (tok_local < q_len)
    token = (q_start + tok_local).to(tl.int64)
    d_offs = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d_offs < HEAD_DIM
    ctx_start = seq_len - q_len
    q_pos = ctx_start + tok_local

    # Launched with PDL: the metadata above is a step input (never written by the kernel just before), so
    # it is read while that kernel runs; wait for it (the KV write) before the queries and the cache, then
    # let the next kernel (the split merge, or the next layer's) be scheduled while this one runs.
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    q_row = tl.multiple_of(token * stride_qt + head * stride_qh, ALIGN)
    q = tl.load(
        q_ptr + q_row[:, None] + d_offs[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # KV range of this tile: causal end, sliding-window start, then this split's share
    first_q = ctx_start + q_block * BLOCK_Q
    last_q = tl.minimum(first_q + BLOCK_Q, seq_len) - 1
    kv_hi = last_q + 1
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(first_q - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
        full_end = kv_lo
    else:
        full_end = (first_q + 1) // BLOCK_N * BLOCK_N
    if USE_SPLIT:  # whole tiles, as even as they divide: split s gets tiles [s T / S, (s + 1) T / S)
        n_tiles = tl.cdiv(tl.maximum(kv_hi - kv_lo, 0), BLOCK_N)
        lo_s = kv_lo + (split * n_tiles // num_splits) * BLOCK_N
        hi_s = tl.minimum(kv_lo + ((split + 1) * n_tiles // num_splits) * BLOCK_N, kv_hi)
    else:
        lo_s = kv_lo
        hi_s = kv_hi
    mid_s = tl.minimum(tl.maximum(full_end, lo_s), hi_s)
    hi_s = tl.maximum(hi_s, mid_s)

    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    k_head_off = kv_head.to(tl.int64) * stride_kh
    v_head_off = kv_head.to(tl.int64) * stride_vh
    for start in range(lo_s, mid_s, BLOCK_N):
        acc, m_i, l_i = _attn_tile(
            acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, start, q_pos, seq_len, k_head_off, v_head_off, d_offs,
            qk_scale, soft_cap, sliding_window, stride_kb, stride_ks, stride_vb, stride_vs,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, False, USE_WINDOW, USE_SOFTCAP, KV_FP8, DOT_PRECISION, ALIGN,
        )
    for start in range(mid_s, hi_s, BLOCK_N):
        acc, m_i, l_i = _attn_tile(
            acc, m_i, l_i, q, k_ptr, v_ptr, bt_row, start, q_pos, seq_len, k_head_off, v_head_off, d_offs,
            qk_scale, soft_cap, sliding_window, stride_kb, stride_ks, stride_vb, stride_vs,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, True, USE_WINDOW, USE_SOFTCAP, KV_FP8, DOT_PRECISION, ALIGN,
        )

    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    io_mask = row_ok[:, None] & d_ok[None, :]
    if USE_SPLIT:
        p_row = tl.multiple_of(split.to(tl.int64) * stride_ps + token * stride_pt + head * stride_ph, ALIGN)
        p_off = p_row[:, None] + d_offs[None, :]
        tl.store(part_out_ptr + p_off, o, mask=io_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(part_lse_ptr + split.to(tl.int64) * stride_ls + token * stride_lt + head, lse, mask=row_ok)
    else:
        o_row = tl.multiple_of(token * stride_ot + head * stride_oh, ALIGN)
        o_off = o_row[:, None] + d_offs[None, :]
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=["tok_base", "num_splits", "stride_ps", "stride_ls"])
def merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, tok_base, num_splits,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PDL: tl.constexpr = False,
):
    """out[t, h] = sum_s 2**(lse_s - lse) * part_out[s, t, h], lse = log2 sum_s 2**lse_s (base 2).
    With PDL (a programmatic dependent launch) it first waits for the attention kernel's partials."""
    pdl_wait(PDL)
    token = tok_base + tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < num_splits
    lse = tl.load(part_lse_ptr + s * stride_ls + token * stride_lt + head, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    total = tl.sum(w, 0)
    w = w / tl.where(total == 0.0, 1.0, total)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    # every split wrote its partial (zeros where it saw no key, with weight 0 here), so this load need not
    # wait for the log-sum-exps above
    part = tl.load(
        part_out_ptr + s[:, None] * stride_ps + token * stride_pt + head * stride_ph + d[None, :],
        mask=s_ok[:, None] & d_ok[None, :], other=0.0,
    )
    o = tl.sum(part * w[:, None], 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["width", "stride_b", "stride_o"])
def walk_table_kernel(bt_ptr, seq_lens_ptr, out_ptr, width, stride_b, stride_o, BLOCK_SIZE: tl.constexpr,
                      CHUNK_I: tl.constexpr, CHUNK_J: tl.constexpr, PDL: tl.constexpr = False):
    """``CHUNK_I`` entries of one row of the physical walk table, placed by rank: a full block goes to the
    number of full blocks of its row with a smaller ``(id, slot)``, the last block keeps its slot, and
    entries past it are not written. The compares scale with a row's own blocks, not the table's width, so
    a graph planned for long rows costs little on short ones. It reads only the metadata, so with PDL it
    runs beside the kernel before it and waits for that kernel only at the end (the attention after it
    then sees that kernel's writes too)."""
    row = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * CHUNK_I + tl.arange(0, CHUNK_I)
    last = (tl.load(seq_lens_ptr + row) + BLOCK_SIZE - 1) // BLOCK_SIZE - 1  # full blocks: slots [0, last)
    if tl.program_id(0) * CHUNK_I <= last:
        ok = (i < width) & (i <= last)
        ids = tl.load(bt_ptr + row * stride_b + i, mask=ok, other=0)
        rank = tl.zeros([CHUNK_I], dtype=tl.int32)
        if tl.program_id(0) * CHUNK_I < last:
            for j0 in range(0, last, CHUNK_J):
                j = j0 + tl.arange(0, CHUNK_J)
                other = tl.load(bt_ptr + row * stride_b + j, mask=j < last, other=0)
                before = (other[None, :] < ids[:, None]) | ((other[None, :] == ids[:, None]) & (j[None, :] < i[:, None]))
                rank += tl.sum((before & (j < last)[None, :]).to(tl.int32), 1)
        tl.store(out_ptr + row * stride_o + tl.where(i < last, rank, i), ids, mask=ok)
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
