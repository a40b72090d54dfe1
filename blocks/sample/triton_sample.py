"""Triton kernel: top-k / top-p / min-p sampling by the exponential race, without computing the top-p
threshold (rejection), reading most rows once or twice.

The race: the sampled token is ``argmax(x / T - log(E))`` over the kept logits, ``E = -log(U)``, with
``U`` a uniform from a counter-based hash of the row's 64-bit key (drawn on the host from the request's
own generator, so a seeded request is reproducible whatever the batch), the round and the token id.
Per row (one program walks whole rows):

* **pass 1** reads the row once: its max and first argmax (the greedy answer), and, for random rows
  without top-k, the race winner ``s`` over the WHOLE row (a draw from the unfiltered distribution);
* **top-k rows** (with or without top-p / min-p): a lower bound of the top-k threshold from the per-lane
  maxima of pass 1, one pass gathering the logits above it into the program's scratch (usually a few
  more than ``k``; gathered by atomics, so in no particular order), then an in-register sort of those
  values gives the exact top-k and top-p thresholds, and the race runs over the scratch (a row with more
  than ``candidates`` searches and races over the whole row instead: same answer);
* **min-p-only rows**: the threshold ``max + T log(min_p)`` is known after pass 1; the logits above it
  are gathered the same way and raced in the scratch;
* **top-p rows without top-k**: rejection. ``s`` is kept iff ``x_s >= max + T log(min_p)`` and (top-p) the mass
  strictly above it is ``< top_p * Z`` (one pass computes ``Z`` and that mass). The kept set is
  ``{x >= t}`` for one ``t``, so a draw from the whole row that lands in it is a draw from the kept
  distribution; a rejected ``x_s`` is below every kept logit, so the next round races over ``x > x_s``
  only (fresh noise) and accepts with probability at least ``top_p``. After ``max_rounds`` rejections
  the exact top-p search runs (rare: top-p 0.9 falls through with probability 0.1 ** max_rounds at most).

So at vocabulary 128k a greedy or unfiltered row reads its logits once, a top-k or min-p row twice (the
second pass only compares and rarely stores), and a top-p row twice with probability ``>= top_p``.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (fp32) and compiled on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocks.sample.triton_race import exp2_fast, first_tile, next_tile, race, round_keys
from blocks.sample.triton_row_stats import (
    merge_stats,
    merged_masses,
    row_pass2_kernel,
    row_stats_kernel,
    split_routes,
    stats_buffers,
    stats_layout,
)
from blocks.sample.triton_search import (
    check_rows,
    default_programs,
    row_params,
    threshold_search,
    workspace,
)

__all__ = ["triton_sample"]


@triton.jit
def _gather(row_ptr, vocab, low, cval, cidx, counter, offs, BLOCK: tl.constexpr, CAP: tl.constexpr,
            PREFETCH: tl.constexpr):
    """Copy the logits ``>= low`` and their token ids into ``cval`` / ``cidx`` (at most ``CAP``, in no
    particular order: slots come from an atomic counter); returns how many there are."""
    tl.atomic_xchg(counter, 0, sem="relaxed")
    tl.debug_barrier()
    pending = first_tile(row_ptr, vocab, offs, PREFETCH)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        x, pending = next_tile(row_ptr, vocab, cols, pending, BLOCK, PREFETCH)
        sel = (cols < vocab) & (x >= low)
        pos = tl.atomic_add(counter + offs * 0, 1, mask=sel, sem="relaxed")  # relaxed: no fence per tile
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


@triton.jit(do_not_specialize=["num_rows"])  # the batch size changes every step
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
    fstats_ptr,
    istats_ptr,
    num_parts,
    max_rounds,
    BLOCK: tl.constexpr,
    PARTS: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    MAX_PASSES: tl.constexpr,
    CAP: tl.constexpr,
    SMALL: tl.constexpr,
    FAST: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    piv_idx = tl.arange(0, NUM_PIVOTS)
    for row in range(pid, num_rows, nprog):
        row64 = tl.zeros([], dtype=tl.int64) + row
        row_ptr = logits_ptr + row64 * stride_row
        cval = cand_val_ptr + row64 * CAP  # the row's scratch and slot counter (row_pass2_kernel fills them)
        cidx = cand_idx_ptr + row64 * CAP
        counter = counter_ptr + row
        temp, greedy, inv_t, top_k, top_p, min_p = row_params(row, temp_ptr, topk_ptr, topp_ptr, minp_ptr)
        c = inv_t * 1.4426950408889634  # log2(e) / T: scores and masses in base 2
        key = tl.load(key_ptr + row)
        need_k = (greedy == 0) & (top_k > 0) & (top_k < vocab)
        need_p = (greedy == 0) & (top_p < 1.0)
        need_min = (greedy == 0) & (min_p > 0.0)
        k1, k2 = round_keys(key, tl.zeros([], dtype=tl.int32))

        # Pass 1 ran in row_stats_kernel (rows cut into chunks): merge this row's chunks
        m, amax, mn, nfin, tok, x_tok, low_k = merge_stats(fstats_ptr, istats_ptr, row, num_parts, vocab, PARTS)
        thr_min = tl.where(need_min, m + tl.log(tl.maximum(min_p, 1e-30)) * temp, float("-inf"))
        hi_top = m + tl.maximum(tl.abs(m) * 1e-6, 1e-6)
        gathered, checked = split_routes(need_k, need_p, need_min, top_k, nfin, x_tok, thr_min)
        if need_k & (top_k >= nfin):  # top-k keeps every finite logit (the rest are banned)
            need_k = need_k & False
            # the draw over the whole row: the answer when no other filter is on, else the rejection route's
            # first candidate (a min-p row replaces it below)
            tok, x_tok = race(row_ptr, cidx, vocab, False, float("-inf"), 0, float("-inf"), c, k1, k2, offs,
                               vocab, BLOCK, FAST)

        if need_k | (need_min & (need_p == 0)):
            # Known threshold (min-p) or a lower bound of it (top-k, from the lane maxima): gather the logits
            # above it, find the exact threshold by sorting them, race in the scratch.
            thr = thr_min
            low = thr_min
            if need_k:
                low = tl.maximum(low_k, mn)  # the min is a bound too: the row has more than k finite logits
            if gathered:  # by row_pass2_kernel (the rare rows that change route above gather here)
                n_cand = tl.load(counter)
            else:
                n_cand = _gather(row_ptr, vocab, low, cval, cidx, counter, offs, BLOCK, CAP, PREFETCH)
            if n_cand <= CAP:
                if need_k:
                    if n_cand <= SMALL:
                        thr = _sorted_threshold(cval, n_cand, m, inv_t, top_k, top_p, need_p, SMALL)
                    else:
                        thr = _sorted_threshold(cval, n_cand, m, inv_t, top_k, top_p, need_p, CAP)
                tok, x_tok = race(cval, cidx, n_cand, True, thr, 0, thr_min, c, k1, k2, offs, vocab, BLOCK, FAST)
            else:  # too many candidates: exact searches over the whole row (token order: reproducible)
                if need_k:
                    thr, mass_k = threshold_search(row_ptr, vocab, m, inv_t, low, hi_top, top_k, MAX_PASSES,
                                                   piv_idx, offs, BLOCK, NUM_PIVOTS, False)
                    if need_p:
                        thr, _ = threshold_search(row_ptr, vocab, m, inv_t, thr, hi_top, top_p * mass_k, MAX_PASSES,
                                                  piv_idx, offs, BLOCK, NUM_PIVOTS, True)
                tok, x_tok = race(row_ptr, cidx, vocab, False, thr, 0, thr_min, c, k1, k2, offs, vocab, BLOCK, FAST)
        elif need_p:
            # Rejection route: accept the race winner if it is in the kept set, else race above it.
            z = tl.zeros([], dtype=tl.float32)
            lo = tl.full([], float("-inf"), dtype=tl.float32)
            accepted = tl.zeros([], dtype=tl.int32)
            r = tl.zeros([], dtype=tl.int32)
            while (accepted == 0) & (r < max_rounds):
                ok = x_tok >= thr_min
                if checked & (r == 0):  # round 0's masses came from row_pass2_kernel
                    z, mass_above = merged_masses(fstats_ptr, row, num_parts, PARTS)
                    ok = mass_above < top_p * z
                elif ok:  # one pass: Z and the mass strictly above the candidate
                    z_vec = tl.zeros([BLOCK], dtype=tl.float32)
                    above = tl.zeros([BLOCK], dtype=tl.float32)
                    pending = first_tile(row_ptr, vocab, offs, PREFETCH)
                    for start in range(0, vocab, BLOCK):
                        cols = start + offs
                        x, pending = next_tile(row_ptr, vocab, cols, pending, BLOCK, PREFETCH)
                        e = tl.where(x > float("-inf"), exp2_fast((x - m) * c, FAST), 0.0)
                        z_vec += e
                        above += tl.where(x > x_tok, e, 0.0)
                    z = tl.sum(z_vec, axis=0)
                    ok = tl.sum(above, axis=0) < top_p * z
                if ok:
                    accepted = accepted + 1
                else:
                    lo = x_tok
                    r += 1
                    k1, k2 = round_keys(key, r)
                    tok, x_tok = race(row_ptr, cidx, vocab, False, lo, 1, thr_min, c, k1, k2, offs, vocab,
                                       BLOCK, FAST)
            if accepted == 0:  # exact fallback: the top-p threshold above the last rejected logit
                z_vec = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, vocab, BLOCK):
                    cols = start + offs
                    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
                    z_vec += tl.where(x > float("-inf"), tl.exp((x - m) * inv_t), 0.0)
                z = tl.sum(z_vec, axis=0)
                lo = tl.maximum(lo, mn)  # no rejection yet: start from the smallest logit
                thr, _ = threshold_search(row_ptr, vocab, m, inv_t, lo, hi_top, top_p * z, MAX_PASSES, piv_idx, offs,
                                          BLOCK, NUM_PIVOTS, True)
                k1, k2 = round_keys(key, r + 1)
                tok, x_tok = race(row_ptr, cidx, vocab, False, thr, 0, thr_min, c, k1, k2, offs, vocab, BLOCK, FAST)
        token = tl.where(greedy | (tok >= vocab), amax, tok)  # a row with no finite logit: its argmax, in range
        tl.store(out_ptr + row, token.to(tl.int64))


def triton_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    keys: torch.Tensor,
    *,
    block: int = 4096,
    num_pivots: int = 8,
    num_programs: int | None = None,
    num_warps: int = 16,
    candidates: int = 1024,
    max_rounds: int = 6,
    prefetch: bool = True,
    maxnreg: int | None = 64,
    stats_block: int = 2048,
    stats_warps: int = 8,
    stats_chunk_tiles: int = 8,
    stats_maxnreg: int | None = None,
) -> torch.Tensor:
    """Sample one token per row from the top-k / top-p / min-p filtered softmax of ``logits / T``.

    Args:
        logits: ``[num_rows, vocab]`` float32, unit stride along the vocabulary (not modified).
        temperature: ``[num_rows]`` float32 (0 = greedy: the first argmax). top_k: ``[num_rows]`` int32/int64
            (0 = off). top_p, min_p: ``[num_rows]`` float32 (1 and 0 = off).
        keys: ``[num_rows]`` int64 random keys, one per row and step.
        block, num_pivots, num_programs, num_warps: tile width (capped at the vocabulary's next power of
            two), pivots per search pass, persistent programs (default one per row, at most 4 per SM), warps.
        candidates: scratch slots per program (rounded up to a power of two, at least 16) for the logits
            above a top-k or min-p row's bound, sorted in registers; a row with more takes the whole-row way.
        max_rounds: rejection rounds of a top-p row without top-k before the exact top-p search.
        prefetch: load the next tile while using this one in the whole-row passes (two tiles in flight).
        maxnreg: cap on registers per thread on CUDA (None = the compiler's choice). 64 lets two 16-warp
            programs share an SM (H200 sweep: 188 us against 193 us uncapped at batch 256 x 128256).
        stats_block, stats_warps, stats_chunk_tiles: the chunked passes (:mod:`blocks.sample.triton_row_stats`):
            tile width (at most ``block``), warps, tiles a chunk. The chunking never depends on the batch, so
            a row's answer does not either (its masses are summed chunk by chunk). stats_maxnreg: their
            register cap on CUDA (more programs an SM, more loads in flight).

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
    block = max(16, min(block, triton.next_power_of_2(vocab)))
    num_programs = num_programs or default_programs(logits)
    cap, cand_val, cand_idx, counters = workspace(num_rows, max(candidates, 16), logits.device)
    sblock = max(16, min(stats_block, block))
    num_parts, chunk_tiles = stats_layout(vocab, sblock, stats_chunk_tiles)
    parts_pad = triton.next_power_of_2(num_parts)
    fstats, istats = stats_buffers(num_rows * num_parts, logits.device)
    stats_opts = {"maxnreg": stats_maxnreg} if stats_maxnreg and logits.is_cuda else {}
    row_stats_kernel[(num_rows, num_parts)](
        logits, logits.stride(0), vocab, chunk_tiles, temperature, top_k, top_p, min_p, keys, fstats, istats,
        counters, BLOCK=sblock, NUM_PIVOTS=num_pivots, FAST=logits.is_cuda, PREFETCH=prefetch, num_warps=stats_warps,
        **stats_opts,
    )
    row_pass2_kernel[(num_rows, num_parts)](
        logits, logits.stride(0), vocab, chunk_tiles, num_parts, temperature, top_k, top_p, min_p, fstats, istats,
        cand_val, cand_idx, counters, BLOCK=sblock, PARTS=parts_pad, CAP=cap, FAST=logits.is_cuda,
        num_warps=stats_warps, **stats_opts,
    )
    _sample_kernel[(num_programs,)](
        logits, logits.stride(0), vocab, num_rows, temperature, top_k, top_p, min_p, keys, out, cand_val, cand_idx,
        counters, fstats, istats, num_parts, max_rounds, BLOCK=block, PARTS=parts_pad,
        NUM_PIVOTS=num_pivots, MAX_PASSES=12, CAP=cap, SMALL=min(cap, 128),
        FAST=logits.is_cuda, PREFETCH=prefetch, num_warps=num_warps,
        **({"maxnreg": maxnreg} if maxnreg and logits.is_cuda else {}),
    )
    return out
