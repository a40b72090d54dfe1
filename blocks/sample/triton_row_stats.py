"""Triton kernel: the first pass of the sampler over a batch of logits, each row cut into chunks.

One program reads one chunk of one row, so a batch of 256 rows at vocabulary 128k runs about a thousand
programs instead of one per row: a single program streaming a whole row reaches only about half of the
card's read bandwidth. Per chunk it writes (``[num_rows, num_parts, 6]`` float32 and ``[.., 3]`` int32):

* the chunk's max and its first argmax (the greedy answer after the merge), its smallest finite logit
  and how many logits are finite;
* for rows that race their whole row (random rows without top-k, except min-p-only rows): the race
  winner of the chunk (score, token id, logit) in round 0 (see :mod:`blocks.sample.triton_race`);
* for top-k rows: two bounds from the chunk's per-lane maxima alone: ``t`` with ``k`` lane maxima
  ``>= t`` (then the row has ``k`` logits ``>= t``), and ``t'`` with ``ceil(k / num_parts)`` of them (if
  every chunk has that many, the row has ``k``: the smallest ``t'`` over the chunks is a bound, and a
  much closer one than the first, since one chunk's ``k``-th largest is far below the row's).

:func:`merge_stats` (called by the sampling kernel, one program per row) combines a row's chunks: the max
and first argmax, the min, the count, the race winner (highest score, then lowest token id: the same token
as one race over the whole row) and the best top-k bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocks.sample.triton_race import exp2_fast, first_tile, next_tile, race_score, round_keys
from blocks.sample.triton_search import lane_bound, row_params

__all__ = ["row_stats_kernel", "row_pass2_kernel", "split_routes", "merged_masses", "merge_stats", "stats_layout",
           "stats_buffers", "NUM_FLOAT_STATS", "NUM_INT_STATS"]

# max, min finite, race score, race logit, top-k bounds (k in one chunk, k / parts in each), then the second
# pass's two masses of a checked row
NUM_FLOAT_STATS = tl.constexpr(8)  # constexpr: the kernels read it
NUM_INT_STATS = tl.constexpr(3)  # first argmax, finite count, race token


@triton.jit
def races_whole_row(greedy, need_k, need_p, need_min):
    """Rows whose first pass also races: random, no top-k, and not min-p alone (those gather instead)."""
    return (greedy == 0) & (need_k == 0) & ((need_min == 0) | need_p)


@triton.jit(do_not_specialize=["chunk_tiles"])
def row_stats_kernel(
    logits_ptr, stride_row, vocab, chunk_tiles, temp_ptr, topk_ptr, topp_ptr, minp_ptr, key_ptr, fstats_ptr,
    istats_ptr, counter_ptr, BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr,
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    num_parts = tl.num_programs(1)
    # this chunk's logits: [start0, end), whole tiles; columns stay absolute and the only mask is
    # ``cols < vocab`` (a multiple of 16 when the vocabulary is: the loads stay 16-byte vector loads)
    start0 = part * chunk_tiles * BLOCK
    end = tl.minimum(start0 + chunk_tiles * BLOCK, vocab)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temp, greedy, inv_t, top_k, top_p, min_p = row_params(row, temp_ptr, topk_ptr, topp_ptr, minp_ptr)
    need_k = (greedy == 0) & (top_k > 0) & (top_k < vocab)
    need_p = (greedy == 0) & (top_p < 1.0)
    need_min = (greedy == 0) & (min_p > 0.0)
    offs = tl.arange(0, BLOCK)

    m_vec = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    i_vec = tl.zeros([BLOCK], dtype=tl.int32) + start0
    mn_vec = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    nfin_vec = tl.zeros([BLOCK], dtype=tl.int32)
    top = tl.full([], float("-inf"), dtype=tl.float32)
    tok = vocab + tl.zeros([], dtype=tl.int32)
    x_tok = tl.full([], float("-inf"), dtype=tl.float32)
    if races_whole_row(greedy, need_k, need_p, need_min):
        c = inv_t * 1.4426950408889634
        k1, k2 = round_keys(tl.load(key_ptr + row), tl.zeros([], dtype=tl.int32))
        best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        best_i = tl.full([BLOCK], vocab, dtype=tl.int32)
        best_x = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        pending = first_tile(row_ptr + start0, vocab - start0, offs, PREFETCH)
        for s in range(start0, end, BLOCK):
            cols = s + offs
            x, pending = next_tile(row_ptr, vocab, cols, pending, BLOCK, PREFETCH)
            fin = x > float("-inf")
            upd = x > m_vec
            m_vec = tl.where(upd, x, m_vec)
            i_vec = tl.where(upd, cols, i_vec)
            mn_vec = tl.minimum(mn_vec, tl.where(fin, x, float("inf")))
            nfin_vec += fin.to(tl.int32)
            sc = tl.where(fin, race_score(x, cols, c, k1, k2, FAST), float("-inf"))
            win = sc > best
            best = tl.where(win, sc, best)
            best_i = tl.where(win, cols, best_i)
            best_x = tl.where(win, x, best_x)
        top = tl.max(best, axis=0)
        tok = tl.min(tl.where(best == top, best_i, vocab), axis=0)
        x_tok = tl.max(tl.where((best == top) & (best_i == tok), best_x, float("-inf")), axis=0)
    else:
        pending = first_tile(row_ptr + start0, vocab - start0, offs, PREFETCH)
        for s in range(start0, end, BLOCK):
            cols = s + offs
            x, pending = next_tile(row_ptr, vocab, cols, pending, BLOCK, PREFETCH)
            fin = x > float("-inf")
            upd = x > m_vec
            m_vec = tl.where(upd, x, m_vec)
            i_vec = tl.where(upd, cols, i_vec)
            mn_vec = tl.minimum(mn_vec, tl.where(fin, x, float("inf")))
            nfin_vec += fin.to(tl.int32)
    m = tl.max(m_vec, axis=0)
    amax = tl.min(tl.where(m_vec == m, i_vec, vocab), axis=0)
    mn = tl.min(mn_vec, axis=0)
    nfin = tl.sum(nfin_vec, axis=0)
    bound = tl.full([], float("-inf"), dtype=tl.float32)
    share = tl.full([], float("-inf"), dtype=tl.float32)
    if need_k & (nfin > 0):
        hi = m + tl.maximum(tl.abs(m) * 1e-6, 1e-6)
        piv_idx = tl.arange(0, NUM_PIVOTS)
        # lane_bound returns its start (the chunk's min) when no pivot qualifies: a bound only if the
        # chunk alone holds that many finite logits
        b = lane_bound(m_vec, mn, hi, top_k, m, inv_t, piv_idx, False, NUM_PIVOTS)
        bound = tl.where((b > mn) | (nfin >= top_k), b, float("-inf"))
        need_share = (top_k + num_parts - 1) // num_parts
        b = lane_bound(m_vec, mn, hi, need_share, m, inv_t, piv_idx, False, NUM_PIVOTS)
        share = tl.where((b > mn) | (nfin >= need_share), b, float("-inf"))

    if part == 0:
        tl.store(counter_ptr + row, 0)  # the second pass's slot counter of this row
    slot = row.to(tl.int64) * num_parts + part
    f = fstats_ptr + slot * NUM_FLOAT_STATS
    tl.store(f, m)
    tl.store(f + 1, mn)
    tl.store(f + 2, top)
    tl.store(f + 3, x_tok)
    tl.store(f + 4, bound)
    tl.store(f + 5, share)
    i = istats_ptr + slot * NUM_INT_STATS
    tl.store(i, amax)
    tl.store(i + 1, nfin)
    tl.store(i + 2, tok)


@triton.jit
def split_routes(need_k, need_p, need_min, top_k, nfin, x_tok, thr_min):
    """Which second passes :func:`row_pass2_kernel` runs for a row, cut into chunks like the first:
    ``gathered`` (top-k rows with more finite logits than k, min-p-only rows: the logits above the bound
    into the row's scratch) and ``checked`` (top-p rows without top-k whose race winner passes min-p: the
    row's mass and the mass above the winner, round 0 of the rejection test)."""
    gathered = (need_k & (top_k < nfin)) | ((need_k == 0) & need_min & (need_p == 0))
    checked = (need_k == 0) & need_p & (x_tok >= thr_min)
    return gathered, checked


@triton.jit(do_not_specialize=["chunk_tiles", "num_parts"])
def row_pass2_kernel(
    logits_ptr, stride_row, vocab, chunk_tiles, num_parts, temp_ptr, topk_ptr, topp_ptr, minp_ptr, fstats_ptr,
    istats_ptr, cand_val_ptr, cand_idx_ptr, counter_ptr, BLOCK: tl.constexpr, PARTS: tl.constexpr,
    CAP: tl.constexpr, FAST: tl.constexpr,
):
    """Second pass over one chunk of one row (grid ``(num_rows, num_parts)``): a gathered row's logits
    ``>= bound`` go to ``cand_*[row * CAP + slot]`` (slots from the row's counter, which the first pass
    zeroed; the count may exceed CAP); a checked row's two masses (base 2, relative to the max) go to
    float stats 6 and 7 of the chunk."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    temp, greedy, inv_t, top_k, top_p, min_p = row_params(row, temp_ptr, topk_ptr, topp_ptr, minp_ptr)
    need_k = (greedy == 0) & (top_k > 0) & (top_k < vocab)
    need_p = (greedy == 0) & (top_p < 1.0)
    need_min = (greedy == 0) & (min_p > 0.0)
    m, amax, mn, nfin, tok, x_tok, low_k = merge_stats(fstats_ptr, istats_ptr, row, num_parts, vocab, PARTS)
    thr_min = tl.where(need_min, m + tl.log(tl.maximum(min_p, 1e-30)) * temp, float("-inf"))
    gathered, checked = split_routes(need_k, need_p, need_min, top_k, nfin, x_tok, thr_min)
    start0 = part * chunk_tiles * BLOCK
    end = tl.minimum(start0 + chunk_tiles * BLOCK, vocab)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    if gathered:
        low = tl.where(need_k, tl.maximum(low_k, mn), thr_min)
        counter = counter_ptr + row + offs * 0
        cval = cand_val_ptr + row.to(tl.int64) * CAP
        cidx = cand_idx_ptr + row.to(tl.int64) * CAP
        for s in range(start0, end, BLOCK):
            cols = s + offs
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
            sel = (cols < vocab) & (x >= low)
            pos = tl.atomic_add(counter, 1, mask=sel, sem="relaxed")
            fits = sel & (pos < CAP)
            tl.store(cval + pos, x, mask=fits)
            tl.store(cidx + pos, cols, mask=fits)
    if checked:
        c = inv_t * 1.4426950408889634
        z_vec = tl.zeros([BLOCK], dtype=tl.float32)
        above = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(start0, end, BLOCK):
            cols = s + offs
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
            e = tl.where(x > float("-inf"), exp2_fast((x - m) * c, FAST), 0.0)
            z_vec += e
            above += tl.where(x > x_tok, e, 0.0)
        f = fstats_ptr + (row.to(tl.int64) * num_parts + part) * NUM_FLOAT_STATS
        tl.store(f + 6, tl.sum(z_vec, axis=0))
        tl.store(f + 7, tl.sum(above, axis=0))


@triton.jit
def merged_masses(fstats_ptr, row, num_parts, PARTS: tl.constexpr):
    """``(Z, mass above the race winner)`` of a checked row, summed over its chunks."""
    p = tl.arange(0, PARTS)
    ok = p < num_parts
    f = fstats_ptr + ((tl.zeros([], dtype=tl.int64) + row) * num_parts + p) * NUM_FLOAT_STATS
    return (tl.sum(tl.load(f + 6, mask=ok, other=0.0), axis=0), tl.sum(tl.load(f + 7, mask=ok, other=0.0), axis=0))


@triton.jit
def merge_stats(fstats_ptr, istats_ptr, row, num_parts, vocab, PARTS: tl.constexpr):
    """One row's ``(max, first argmax, min finite, finite count, race token, its logit, top-k bound)``
    from its ``num_parts <= PARTS`` chunks (race token ``vocab`` when nothing raced)."""
    p = tl.arange(0, PARTS)
    ok = p < num_parts
    slot = (tl.zeros([], dtype=tl.int64) + row) * num_parts + p
    m_p = tl.load(fstats_ptr + slot * NUM_FLOAT_STATS, mask=ok, other=float("-inf"))
    mn_p = tl.load(fstats_ptr + slot * NUM_FLOAT_STATS + 1, mask=ok, other=float("inf"))
    sc_p = tl.load(fstats_ptr + slot * NUM_FLOAT_STATS + 2, mask=ok, other=float("-inf"))
    x_p = tl.load(fstats_ptr + slot * NUM_FLOAT_STATS + 3, mask=ok, other=float("-inf"))
    b_p = tl.load(fstats_ptr + slot * NUM_FLOAT_STATS + 4, mask=ok, other=float("-inf"))
    sh_p = tl.load(fstats_ptr + slot * NUM_FLOAT_STATS + 5, mask=ok, other=float("inf"))
    am_p = tl.load(istats_ptr + slot * NUM_INT_STATS, mask=ok, other=vocab)
    nf_p = tl.load(istats_ptr + slot * NUM_INT_STATS + 1, mask=ok, other=0)
    tk_p = tl.load(istats_ptr + slot * NUM_INT_STATS + 2, mask=ok, other=vocab)
    m = tl.max(m_p, axis=0)
    amax = tl.min(tl.where(ok & (m_p == m), am_p, vocab), axis=0)
    top = tl.max(sc_p, axis=0)
    tok = tl.min(tl.where(ok & (sc_p == top), tk_p, vocab), axis=0)
    x_tok = tl.max(tl.where(ok & (sc_p == top) & (tk_p == tok), x_p, float("-inf")), axis=0)
    # top-k bound: a chunk with k logits >= b, or every chunk with ceil(k / num_parts) logits >= b
    low_k = tl.maximum(tl.max(b_p, axis=0), tl.min(sh_p, axis=0))
    return m, amax, tl.min(mn_p, axis=0), tl.sum(nf_p, axis=0), tok, x_tok, low_k


def stats_layout(vocab: int, block: int, chunk_tiles: int) -> tuple[int, int]:
    """``(num_parts, chunk_tiles)``: chunks of ``chunk_tiles`` whole tiles of ``block`` logits. It depends on
    the vocabulary and the configuration only, never on the batch: a row's sums come out the same alone
    or in any batch."""
    if chunk_tiles < 1:
        raise ValueError(f"stats_chunk_tiles must be at least 1, got {chunk_tiles}.")
    tiles = triton.cdiv(vocab, block)
    chunk_tiles = min(chunk_tiles, tiles)
    return triton.cdiv(tiles, chunk_tiles), chunk_tiles


_BUFFERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def stats_buffers(num_slots: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float32 [>= num_slots * 8], int32 [>= num_slots * 3])`` kept per (device, stream) and grown on
    demand, so a step allocates nothing (calls on one stream run in order)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    bufs = _BUFFERS.get(key)
    if bufs is None or bufs[1].numel() < num_slots * NUM_INT_STATS.value:
        n = max(num_slots, 1024)
        bufs = _BUFFERS[key] = (torch.empty(n * NUM_FLOAT_STATS.value, dtype=torch.float32, device=device),
                                torch.empty(n * NUM_INT_STATS.value, dtype=torch.int32, device=device))
    return bufs
