"""Triton kernel: top-k / top-p / min-p sampling, without computing the top-p threshold (rejection), reading
most rows twice.

Each row draws from its own 64-bit key (drawn on the host from the request's own generator, so a seeded request
is reproducible whatever the batch). One program walks whole rows:

* **pass 1** reads the row once: its max and first argmax (the greedy answer); for **top-p rows without top-k**
  and rows with no filter, also its softmax's mass per lane, from which ``NUM_DRAWS`` inverse-CDF draws from the
  unfiltered distribution follow (:mod:`blocks.sample.triton_inverse_cdf`; a row with no filter is done);
* **top-k rows** (with or without top-p / min-p): a lower bound of the top-k threshold from the per-lane
  maxima of pass 1, one pass gathering the logits above it into the program's scratch (usually a few
  more than ``k``; gathered by atomics, so in no particular order; it reads only the chunks whose max, kept by
  pass 1, reaches the bound: :mod:`blocks.sample.triton_chunks`), then an in-register sort of those
  values gives the exact top-k and top-p thresholds, and an exponential race (``argmax(x / T - log(E))``, ``E``
  from a counter-based hash of the key, the round and the token id; :mod:`blocks.sample.triton_race`) runs over
  the scratch (a row with more than ``candidates`` searches and races over the whole row instead: same answer);
* **min-p-only rows**: the threshold ``max + T log(min_p)`` is known after pass 1; the logits above it
  are gathered the same way and raced in the scratch;
* **top-p rows without top-k**: rejection. A draw ``s`` is kept iff ``x_s >= max + T log(min_p)`` and (top-p) the
  mass strictly above it is ``< top_p * Z``; one pass computes ``Z`` and the masses above all draws, and the first
  kept draw is the token (each is kept with probability at least ``top_p``). The kept set is ``{x >= t}`` for one
  ``t``, so a rejected ``x_s`` is below every kept logit, and later rounds race over ``x > max rejected x_s`` only
  (fresh noise). Those rounds (all draws rejected: probability ``(1 - top_p) ** 4`` at most) run in place or, with
  ``defer_rejections``, in a second kernel spread over the GPU (:mod:`blocks.sample.triton_reject`); after
  ``max_rounds`` in all, the exact top-p search runs.

So at vocabulary 128k a greedy row or a row with no filter reads its logits once, a top-p row twice (the second
pass only compares and adds), and a top-k or min-p row once plus the chunks that hold its candidates.

The draws of a top-p row depend on ``block`` (the column order of the inverse CDF), not on the rows beside it.

H100, batch 256 x 128256 (benchmarks/RESULTS.md, sessions 9 and 10; GPU time, random keys): with the race in pass
1 (its winner and runner-up as the two draws; about 30 instructions a logit) the benchmark's mixed batch took 144 us
and a batch of top-p rows 169 us; with inverse-CDF draws 139 and 126 us (134 and 121 without the tail's launch);
with the chunk-selected second pass of top-k and min-p rows 121 and 130 us.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (fp32) and compiled on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from blocks.sample.triton_chunks import (
    CHUNK_ROWS,
    ROWS,
    chunk_cols,
    chunk_max_init,
    chunk_max_update,
    select_chunks,
    store_chunk_max,
    tile_offsets,
)
from blocks.sample.triton_inverse_cdf import (
    DRAWS,
    NUM_DRAWS,
    draw_uniforms,
    inverse_cdf_draws,
    masses_above,
    pick,
    softmax_pass,
)
from blocks.sample.triton_penalties import penalize_row, penalty_launch_args
from blocks.sample.triton_race import race, round_keys
from blocks.sample.triton_reject import (
    CHUNK,
    launch_reject_tail,
    mass_above,
    min_p_floor,
    reject_rounds,
    reject_workspace,
)
from blocks.sample.triton_search import (
    check_rows,
    lane_bound,
    launch_layout,
    per_stream,
    row_params,
    threshold_search,
)

__all__ = ["triton_sample", "should_defer"]


@triton.jit
def _gather(row_ptr, vocab, low, cval, cidx, counter, cmax, clist, BLOCK: tl.constexpr, NCH: tl.constexpr,
            CAP: tl.constexpr, STAGES: tl.constexpr):
    """Copy the logits ``>= low`` and their token ids into ``cval`` / ``cidx`` (at most ``CAP``, in no
    particular order: slots come from an atomic counter), reading only the chunks whose max (pass 1's, at ``cmax``)
    is ``>= low``; returns how many there are."""
    n_sel = select_chunks(cmax, clist, tl.cdiv(vocab, BLOCK // ROWS), low, NCH)
    tl.atomic_xchg(counter, 0, sem="relaxed")
    tl.debug_barrier()
    for g in tl.range(0, n_sel, ROWS, num_stages=STAGES):
        cols, ok = chunk_cols(clist, g, n_sel, vocab, True, ROWS, BLOCK // ROWS)
        x = tl.load(row_ptr + cols, mask=ok, other=float("-inf"))
        sel = ok & (x >= low)
        pos = tl.atomic_add(counter + cols * 0, 1, mask=sel, sem="relaxed")  # relaxed: no fence per tile
        fits = sel & (pos < CAP)
        tl.store(cval + pos, x, mask=fits)
        tl.store(cidx + pos, cols, mask=fits)
    tl.debug_barrier()
    return tl.atomic_add(counter, 0, sem="relaxed")


@triton.jit
def _sorted_threshold(cval, n, m, inv_t, top_k, top_p, need_p, N: tl.constexpr):
    """Exact top-k (then top-p on the top-k mass) threshold of the ``n <= N`` values in ``cval``, by
    sorting them in registers: the ``k``-th largest value, then the value where the mass, summed from the
    top, first reaches ``top_p`` of the top-k mass (ties at either threshold are kept)."""
    j = tl.arange(0, N)
    v = tl.sort(tl.load(cval + j, mask=j < n, other=float("-inf")), descending=True)
    thr = tl.max(tl.where(j == top_k - 1, v, float("-inf")), axis=0)
    if need_p:
        e = tl.where(v >= thr, tl.exp((v - m) * inv_t), 0.0)
        cum = tl.cumsum(e, axis=0)
        first = tl.min(tl.where(cum >= top_p * tl.sum(e, axis=0), j, N), axis=0)
        thr = tl.maximum(thr, tl.max(tl.where(j == first, v, float("-inf")), axis=0))
    return thr


# num_rows and the penalty lengths change every step; max_rounds = 1, specialised to a constant, crashes the
# coalescing pass of Triton 3.6
@triton.jit(do_not_specialize=["num_rows", "stride_ids", "max_len", "max_rounds"])
def _sample_kernel(
    logits_ptr,
    stride_row,
    vocab,
    num_rows,
    temp_ptr,
    topk_ptr,
    topp_ptr,
    minp_ptr,
    key_ptr,
    out_ptr,
    cand_val_ptr,
    cand_idx_ptr,
    counter_ptr,
    chunk_max_ptr,
    chunk_list_ptr,
    pend_row_ptr,
    pend_val_ptr,
    pend_key_ptr,
    count_ptr,
    max_rounds,
    pen_ids_ptr,
    stride_ids,
    counts_ptr,
    stride_c,
    rep_ptr,
    freq_ptr,
    pres_ptr,
    pen_scratch_ptr,
    max_len,
    DEFER: tl.constexpr,
    PENALTY: tl.constexpr,
    PEN_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    NJ: tl.constexpr,
    NCH: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    MAX_PASSES: tl.constexpr,
    CAP: tl.constexpr,
    SMALL: tl.constexpr,
    FAST: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    piv_idx = tl.arange(0, NUM_PIVOTS)
    draw_idx = tl.arange(0, NUM_DRAWS)
    cval = cand_val_ptr + pid * CAP
    cidx = cand_idx_ptr + pid * CAP
    counter = counter_ptr + pid
    cmax = chunk_max_ptr + pid * NCH
    clist = chunk_list_ptr + pid * NCH
    offs2 = tile_offsets(BLOCK, ROWS)
    for row in range(pid, num_rows, nprog):
        row_ptr = logits_ptr + (tl.zeros([], dtype=tl.int64) + row) * stride_row
        # the key first: it may come from pinned host memory (PCIe latency, overlapped with the penalties)
        key = tl.load(key_ptr + row)
        temp, greedy, inv_t, top_k, top_p, min_p = row_params(row, temp_ptr, topk_ptr, topp_ptr, minp_ptr)
        c = inv_t * 1.4426950408889634  # log2(e) / T: scores and masses in base 2
        if PENALTY:  # in place on the row, then a barrier before any thread reads it
            penalize_row(row, logits_ptr, stride_row, pen_ids_ptr, stride_ids, counts_ptr, stride_c, rep_ptr, freq_ptr,
                         pres_ptr, pen_scratch_ptr, max_len, PEN_BLOCK)
            tl.debug_barrier()
        need_k = (greedy == 0) & (top_k > 0) & (top_k < vocab)
        need_p = (greedy == 0) & (top_p < 1.0)
        need_min = (greedy == 0) & (min_p > 0.0)
        k1, k2 = round_keys(key, tl.zeros([], dtype=tl.int32))

        # Pass 1: max and first argmax; rows that draw from the whole row (top-p without top-k, or no filter)
        # also their draws; the others the smallest finite logit and the number of finite logits.
        m_vec = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        i_vec = tl.zeros([BLOCK], dtype=tl.int32)
        mn = tl.full([], float("inf"), dtype=tl.float32)
        nfin = tl.zeros([], dtype=tl.int32)
        z = tl.zeros([], dtype=tl.float32)
        tok = vocab + tl.zeros([], dtype=tl.int32)
        toks = tl.full([NUM_DRAWS], vocab, dtype=tl.int32)
        xs = tl.full([NUM_DRAWS], float("-inf"), dtype=tl.float32)
        if greedy | need_k | (need_min & (need_p == 0)):  # also the chunk maxima for the second pass
            m2 = tl.full([ROWS, BLOCK // ROWS], float("-inf"), dtype=tl.float32)
            i2 = tl.zeros([ROWS, BLOCK // ROWS], dtype=tl.int32)
            mn2 = tl.full([ROWS, BLOCK // ROWS], float("inf"), dtype=tl.float32)
            nfin2 = tl.zeros([ROWS, BLOCK // ROWS], dtype=tl.int32)
            cm = chunk_max_init(ROWS, NCH // ROWS)
            for start in tl.range(0, vocab, BLOCK, num_stages=STAGES):
                cols = start + offs2
                x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
                fin = x > float("-inf")
                upd = x > m2
                m2 = tl.where(upd, x, m2)
                i2 = tl.where(upd, cols, i2)
                mn2 = tl.minimum(mn2, tl.where(fin, x, float("inf")))
                nfin2 += fin.to(tl.int32)
                cm = chunk_max_update(cm, start // BLOCK, x, NCH // ROWS)
            store_chunk_max(cmax, cm, ROWS, NCH // ROWS)
            m_vec = tl.reshape(m2, [BLOCK])
            i_vec = tl.reshape(i2, [BLOCK])
            mn = tl.min(tl.min(mn2, axis=1), axis=0)
            nfin = tl.sum(tl.sum(nfin2, axis=1), axis=0)
        else:  # top-p rows without top-k, and rows with no filter: NUM_DRAWS draws by inverse CDF
            m_vec, i_vec, s_vec = softmax_pass(row_ptr, vocab, c, BLOCK, ROWS, FAST, STAGES)
            toks, xs, z = inverse_cdf_draws(row_ptr, vocab, m_vec, s_vec, tl.max(m_vec, axis=0), c,
                                            draw_uniforms(k1, k2, NUM_DRAWS), offs, BLOCK, NJ, FAST)
            tok = pick(toks, draw_idx, 0)  # the answer of a row with no filter
        m = tl.max(m_vec, axis=0)
        amax = tl.min(tl.where(m_vec == m, i_vec, vocab), axis=0)
        thr_min = min_p_floor(m, temp, min_p, greedy)
        hi_top = m + tl.maximum(tl.abs(m) * 1e-6, 1e-6)
        if need_k & (top_k >= nfin):  # top-k keeps every finite logit (the rest are banned)
            need_k = need_k & False
            # the draw over the whole row: the answer when no other filter is on, else the rejection route's
            # only draw (a min-p row replaces it below)
            tok, x_tok = race(row_ptr, cidx, vocab, False, float("-inf"), 0, float("-inf"), c, k1, k2, offs,
                               vocab, BLOCK, FAST)
            toks = tl.where(draw_idx == 0, tok, vocab)
            xs = tl.where(draw_idx == 0, x_tok, float("-inf"))
            if need_p:  # that route needs Z, which only the draws' pass 1 computes
                z = mass_above(row_ptr, vocab, m, c, float("-inf"), BLOCK, FAST, STAGES)

        if need_k | (need_min & (need_p == 0)):
            # Known threshold (min-p) or a lower bound of it (top-k, from the lane maxima): gather the logits
            # above it, find the exact threshold by sorting them, race in the scratch.
            thr = thr_min
            low = thr_min
            if need_k:
                low = lane_bound(m_vec, mn, hi_top, top_k, m, inv_t, piv_idx, False, NUM_PIVOTS)
            n_cand = _gather(row_ptr, vocab, low, cval, cidx, counter, cmax, clist, BLOCK, NCH, CAP, STAGES)
            if n_cand <= CAP:
                if need_k:
                    if n_cand <= SMALL:
                        thr = _sorted_threshold(cval, n_cand, m, inv_t, top_k, top_p, need_p, SMALL)
                    else:
                        thr = _sorted_threshold(cval, n_cand, m, inv_t, top_k, top_p, need_p, CAP)
                tok, _ = race(cval, cidx, n_cand, True, thr, 0, thr_min, c, k1, k2, offs, vocab, BLOCK, FAST, STAGES)
            else:  # too many candidates: exact searches over the whole row (token order: reproducible)
                if need_k:
                    thr, mass_k = threshold_search(row_ptr, vocab, m, inv_t, low, hi_top, top_k, MAX_PASSES,
                                                   piv_idx, offs, BLOCK, NUM_PIVOTS, False)
                    if need_p:
                        thr, _ = threshold_search(row_ptr, vocab, m, inv_t, thr, hi_top, top_p * mass_k, MAX_PASSES,
                                                  piv_idx, offs, BLOCK, NUM_PIVOTS, True)
                tok, _ = race(row_ptr, cidx, vocab, False, thr, 0, thr_min, c, k1, k2, offs, vocab, BLOCK, FAST, STAGES)
        elif need_p:
            # Rejection route: the first of the draws in the kept set; if none is, more rounds above them all,
            # here or (DEFER) in the tail kernel (blocks.sample.triton_reject).
            rejected = max_rounds <= 0  # no rounds at all: the exact search
            lo = tl.full([], float("-inf"), dtype=tl.float32)
            if max_rounds > 0:  # one pass over the whole row: the masses above every draw
                live = (draw_idx < max_rounds) & (toks < vocab)
                a0, a1, a2, a3 = masses_above(row_ptr, vocab, m, c, pick(xs, draw_idx, 0), pick(xs, draw_idx, 1),
                                              pick(xs, draw_idx, 2), pick(xs, draw_idx, 3), BLOCK, ROWS, NUM_DRAWS,
                                              FAST, STAGES)
                above = tl.where(draw_idx == 0, a0, tl.where(draw_idx == 1, a1, tl.where(draw_idx == 2, a2, a3)))
                ok = live & (xs >= thr_min) & (above < top_p * z)
                first = tl.min(tl.where(ok, draw_idx, NUM_DRAWS), axis=0)
                rejected = first >= NUM_DRAWS
                tok = tl.where(rejected, vocab, pick(toks, draw_idx, first))
                lo = tl.max(tl.where(draw_idx < max_rounds, xs, float("-inf")), axis=0)
            if rejected:
                if (max_rounds > NUM_DRAWS) & DEFER:
                    slot = tl.atomic_add(count_ptr, 1, sem="relaxed")
                    tl.store(pend_row_ptr + slot, row)
                    tl.store(pend_key_ptr + slot, key)
                    tl.store(pend_val_ptr + slot * 4, lo)
                    tl.store(pend_val_ptr + slot * 4 + 1, m)
                    tl.store(pend_val_ptr + slot * 4 + 2, z)
                    tl.store(pend_val_ptr + slot * 4 + 3, amax.to(tl.float32))
                else:
                    tok = reject_rounds(row_ptr, cidx, vocab, m, z, lo, tl.minimum(max_rounds, NUM_DRAWS), max_rounds,
                                        key, temp, top_p, thr_min, c, inv_t, piv_idx, offs, BLOCK, NUM_PIVOTS,
                                        MAX_PASSES, FAST, STAGES)
        token = tl.where(greedy | (tok >= vocab), amax, tok)  # a row with no finite logit: its argmax, in range
        tl.store(out_ptr + row, token.to(tl.int64))


# Defer when more than this many rows are expected to reject all their draws: in-place rounds cost one program
# two more passes over its row (tens of microseconds), the tail kernel a launch (a few).
DEFER_ABOVE_EXPECTED_REJECTIONS = 0.1


def should_defer(top_p_only: np.ndarray) -> bool:
    """Whether a batch whose top-p rows without top-k have these ``top_p`` values should run rejection rounds in the
    tail kernel (``defer_rejections``): all ``NUM_DRAWS`` draws of a row are rejected with probability at most
    ``(1 - top_p) ** NUM_DRAWS``."""
    return float(((1.0 - top_p_only.astype(np.float64)) ** DRAWS).sum()) > DEFER_ABOVE_EXPECTED_REJECTIONS


def triton_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    keys: torch.Tensor,
    *,
    block: int = 2048,
    num_pivots: int = 8,
    num_programs: int | None = None,
    num_warps: int = 16,
    candidates: int = 1024,
    max_rounds: int = 6,
    maxnreg: int | None = 64,
    stages: int = 3,
    defer_rejections: bool = True,
    tail_chunk: int = CHUNK,
    penalties: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Sample one token per row from the top-k / top-p / min-p filtered softmax of ``logits / T``.

    Args:
        logits: ``[num_rows, vocab]`` float32, unit stride along the vocabulary (modified only by ``penalties``).
        temperature: ``[num_rows]`` float32 (0 = greedy: the first argmax). top_k: ``[num_rows]`` int32/int64
            (0 = off). top_p, min_p: ``[num_rows]`` float32 (1 and 0 = off).
        keys: ``[num_rows]`` int64 random keys, one per row and step.
        block, num_pivots, num_programs, num_warps: tile width (capped at the vocabulary's next power of
            two), pivots per search pass, persistent programs (default one per row, at most 4 per SM), warps.
        candidates: scratch slots per program (rounded up to a power of two, at least 16) for the logits
            above a top-k or min-p row's bound, sorted in registers; a row with more takes the whole-row way.
        max_rounds: rejection rounds (draws checked) of a top-p row without top-k before the exact top-p search;
            the first ``NUM_DRAWS`` (4) are pass 1's draws.
        defer_rejections: run the rounds after a top-p row's ``NUM_DRAWS`` rejected draws in a second kernel
            spread over the GPU (:mod:`blocks.sample.triton_reject`) instead of one program a row; ``False``
            saves its launch (the rounds then run in place, should one be needed; :func:`should_defer` says when
            that is likely). Same tokens either way in distribution, not draw for draw.
        tail_chunk: logits a program of that second kernel reads (a power of two, at least 16).
        penalties: ``(token_ids, output_counts, repetition_penalty, frequency_penalty, presence_penalty)`` as
            :func:`blocks.sample.triton_penalties.triton_apply_penalties` takes them: each program applies its
            row's penalties to ``logits`` in place before sampling it (one launch fewer). ``None``: none, and
            ``logits`` is not modified.
        maxnreg: cap on registers per thread on CUDA (None = the compiler's choice). 64 lets two 16-warp
            programs share an SM (H200 sweep: 188 us against 193 us uncapped at batch 256 x 128256).
        stages: software-pipelining depth of the whole-row loops (``tl.range(num_stages=...)``, cp.async into
            shared memory on CUDA; 1 = none). Tiles of 2048 in 3 stages took 182.8 us on an H100 against
            201.3 us for tiles of 4096 with the next tile prefetched in registers (the option it replaced).

    Returns:
        ``[num_rows]`` int64 token ids.
    """
    check_rows(logits)
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be non-negative, got {max_rounds}.")
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    if tail_chunk < 16 or tail_chunk & (tail_chunk - 1):
        raise ValueError(f"tail_chunk must be a power of two >= 16, got {tail_chunk}.")
    block, num_programs, cap, cand_val, cand_idx, counters = launch_layout(logits, block, num_programs,
                                                                           max(candidates, 16))
    nch = triton.next_power_of_2(triton.cdiv(vocab, block) * CHUNK_ROWS)  # every tile stores ROWS chunk maxima
    chunk_max, chunk_list = per_stream(
        "chunks", logits.device, (num_programs * nch,),
        lambda n: (torch.empty(n, dtype=torch.float32, device=logits.device),
                   torch.empty(n, dtype=torch.int32, device=logits.device)))
    defer = defer_rejections and max_rounds > 1
    ws = reject_workspace(num_rows, vocab, logits.device, tail_chunk)
    fast = logits.is_cuda
    use_penalties = penalties is not None and penalties[0].shape[1] > 0
    if use_penalties:
        pen_args, pen_block = penalty_launch_args(logits, *penalties)
    else:  # placeholders the kernel never reads
        pen_args, pen_block = (keys, 0, counters, 0, temperature, temperature, temperature, cand_val, 0), 16
    _sample_kernel[(num_programs,)](
        logits, logits.stride(0), vocab, num_rows, temperature, top_k, top_p, min_p, keys, out, cand_val, cand_idx,
        counters, chunk_max, chunk_list, ws["rows"], ws["values"], ws["keys"], ws["counters"], max_rounds, *pen_args, DEFER=defer,
        PENALTY=use_penalties, PEN_BLOCK=pen_block, BLOCK=block, NJ=triton.next_power_of_2(triton.cdiv(vocab, block)), NCH=nch,
        NUM_PIVOTS=num_pivots, MAX_PASSES=12, CAP=cap, SMALL=min(cap, 128), FAST=fast, STAGES=stages,
        num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg and fast else {}),
    )
    if defer:
        launch_reject_tail(logits, temperature, top_k, top_p, min_p, out, ws, cand_idx, max_rounds, block=block,
                           num_pivots=num_pivots, fast=fast, stages=stages, chunk=tail_chunk)
    return out
