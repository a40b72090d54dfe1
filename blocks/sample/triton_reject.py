"""Triton: the rejection rounds of top-p rows without top-k, and a second kernel that runs them spread over
the GPU.

A top-p row of the sampling kernel (:mod:`blocks.sample.triton_sample`) checks ``NUM_DRAWS`` draws from its whole
row (rounds 0 to 3) with one more pass. About ``(1 - top_p)^4`` of such rows reject them all. Each later round is
a race over the values above the largest rejected logit plus a mass pass (:func:`mass_above`), two more passes over
the 512 KB row for one program; at batch 256 x 128256 on an H100 such rounds run nearly alone at the end of the
kernel.

So the sampling kernel may defer a rejected row: it appends ``(row, rejected logit, max, Z, argmax)`` to a list and
moves on. :func:`launch_reject_tail` then runs the next two rounds of every listed row at once, in chunks of
``CHUNK`` logits, one chunk a program: each chunk runs both rounds' races (independent noise) over its values
above the rejected logit and sums the probability mass above ``NUM_CUTS`` cut points spread between the
rejected logit and the row max. The last chunk of a row to finish (an acquire-release counter) merges them:
the two winners, and the cut points the top-p rule keeps or rejects. A winner at or above a kept cut point
is kept, one at or below a rejected cut point is rejected, without another pass; the second round's winner counts
only if the first's is rejected. Only a winner between the two neighbouring cut points needs its exact mass
(one pass), and only when both are rejected does that program run more rounds over the whole row
(:func:`reject_rounds`, the rounds the sampling kernel runs when nothing is deferred).

A round may race over any superset of the kept set, as long as its noise is fresh; a rejected cut point
bounds the kept set as a rejected logit does. So the draws keep the distribution exact.

The list, the counters and the chunks' partial results live in a workspace per (device, stream): the tail
kernel's last program resets the counters, so a step launches no memset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocks.sample.triton_chunks import ROWS
from blocks.sample.triton_inverse_cdf import NUM_DRAWS, masses_above
from blocks.sample.triton_race import exp2, race, race_result, race_step, round_keys
from blocks.sample.triton_search import max_programs, per_stream, row_params, threshold_search

__all__ = ["mass_above", "reject_rounds", "min_p_floor", "launch_reject_tail", "reject_workspace", "CHUNK",
           "NUM_CUTS"]

CHUNK = 4096  # logits a tail program reads: 32 chunks for a 128k row
TAIL_FIRST_ROUND = NUM_DRAWS  # the sampling kernel checks NUM_DRAWS draws; the tail draws the next two rounds
NUM_CUTS = 16  # cut points between a rejected logit and the row max
ROW_STAGES = 6  # pipelining depth of the tail's rare whole-row passes: one program alone, latency-bound


@triton.jit
def min_p_floor(m, temp, min_p, greedy):
    """The min-p bound ``m + T log(min_p)`` of a row with max ``m`` (``-inf`` when min-p is off)."""
    need_min = (greedy == 0) & (min_p > 0.0)
    return tl.where(need_min, m + tl.log(tl.maximum(min_p, 1e-30)) * temp, float("-inf"))


@triton.jit
def mass_above(row_ptr, vocab, m, c, cut, BLOCK: tl.constexpr, FAST: tl.constexpr, STAGES: tl.constexpr):
    """One pass over the whole row: the mass strictly above the logit ``cut`` (masses ``2 ** ((x - m) * c)``)."""
    return masses_above(row_ptr, vocab, m, c, cut, cut, cut, cut, BLOCK, ROWS, 1, FAST, STAGES)[0]


@triton.jit
def reject_rounds(row_ptr, ids, vocab, m, z, lo, r, max_rounds, key, temp, top_p, thr_min, c, inv_t, piv_idx, offs,
                  BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr, MAX_PASSES: tl.constexpr, FAST: tl.constexpr,
                  STAGES: tl.constexpr):
    """Rounds ``r, r + 1, ...`` of a top-p row whose logits ``<= lo`` are known to be outside the kept set
    (``Z`` = ``z``): race over ``x > lo``, keep the winner if the mass above it is ``< top_p * Z``, else raise
    ``lo`` to it. After ``max_rounds`` rounds in all, the exact top-p search and a race above its threshold.
    One program, whole-row passes. Returns the token."""
    tok = vocab + tl.zeros([], dtype=tl.int32)
    accepted = tl.zeros([], dtype=tl.int32)
    while (accepted == 0) & (r < max_rounds):
        k1, k2 = round_keys(key, r)
        tok, x_tok = race(row_ptr, ids, vocab, False, lo, 1, thr_min, c, k1, k2, offs, vocab, BLOCK, FAST, STAGES)
        above = mass_above(row_ptr, vocab, m, c, x_tok, BLOCK, FAST, 1)
        if (x_tok >= thr_min) & (above < top_p * z):
            accepted = accepted + 1
        else:
            lo = x_tok
            r += 1
    if accepted == 0:  # exact fallback: the top-p threshold above the last rejected logit
        z_vec = tl.zeros([BLOCK], dtype=tl.float32)
        mn_vec = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
            fin = x > float("-inf")
            z_vec += tl.where(fin, tl.exp((x - m) * inv_t), 0.0)
            mn_vec = tl.minimum(mn_vec, tl.where(fin, x, float("inf")))
        z_nat = tl.sum(z_vec, axis=0)
        lo = tl.maximum(lo, tl.min(mn_vec, axis=0))  # no rejection yet: start from the smallest logit
        hi_top = m + tl.maximum(tl.abs(m) * 1e-6, 1e-6)
        thr, _ = threshold_search(row_ptr, vocab, m, inv_t, lo, hi_top, top_p * z_nat, MAX_PASSES, piv_idx, offs,
                                  BLOCK, NUM_PIVOTS, True)
        k1, k2 = round_keys(key, r + 1)
        tok, _ = race(row_ptr, ids, vocab, False, thr, 0, thr_min, c, k1, k2, offs, vocab, BLOCK, FAST, STAGES)
    return tok


@triton.jit
def _merged_candidate(parts, toks, valid, j: tl.constexpr, BIG):
    """Candidate ``j`` of a row from its chunks' partials: ``(token, logit)``."""
    scores = tl.load(parts + 2 * j, mask=valid, other=float("-inf"), volatile=True)
    xs = tl.load(parts + 2 * j + 1, mask=valid, other=float("-inf"), volatile=True)
    _, tok, w = race_result(scores, tl.load(toks + j, mask=valid, other=BIG, volatile=True), xs, BIG)
    return tok, w


@triton.jit
def _kept(w, kept_lo, rejected_hi, row_ptr, vocab, m, c, top_p, z, BLOCK: tl.constexpr, FAST: tl.constexpr,
          STAGES: tl.constexpr):
    """Whether candidate logit ``w`` is in the kept set: from the cut points when it lies at or above a kept one
    or at or below a rejected one, else from one pass for its exact mass."""
    ok = (w >= kept_lo).to(tl.int32)
    if (w < kept_lo) & (w > rejected_hi):
        w_above = mass_above(row_ptr, vocab, m, c, w, BLOCK, FAST, STAGES)
        ok = (w_above < top_p * z).to(tl.int32)
    return ok


@triton.jit(do_not_specialize=["max_rounds"])
def _reject_tail_kernel(logits_ptr, stride_row, vocab, temp_ptr, topk_ptr, topp_ptr, minp_ptr, out_ptr,
                        pend_row_ptr, pend_val_ptr, pend_key_ptr, count_ptr, done_ptr, arrive_ptr, part_val_ptr,
                        part_tok_ptr, ids_ptr, max_rounds, CHUNK: tl.constexpr, NCH: tl.constexpr, NUM_CUTS: tl.constexpr,
                        TILE: tl.constexpr, BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr,
                        MAX_PASSES: tl.constexpr, FAST: tl.constexpr, STAGES: tl.constexpr,
                        ROW_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_chunks = tl.cdiv(vocab, CHUNK)
    offs = tl.arange(0, TILE)
    cut_idx = tl.arange(0, NUM_CUTS)
    ch_idx = tl.arange(0, NCH)
    width = 4 + NUM_CUTS  # a chunk's partial: (best score, its logit) of both rounds, the cut masses (tokens apart)
    count = tl.load(count_ptr)
    for item in range(pid, count * n_chunks, nprog):
        slot = item // n_chunks
        ch = item % n_chunks
        row = tl.load(pend_row_ptr + slot)
        lo = tl.load(pend_val_ptr + slot * 4)
        m = tl.load(pend_val_ptr + slot * 4 + 1)
        z = tl.load(pend_val_ptr + slot * 4 + 2)
        temp, greedy, inv_t, _top_k, top_p, min_p = row_params(row, temp_ptr, topk_ptr, topp_ptr, minp_ptr)
        c = inv_t * 1.4426950408889634
        key = tl.load(pend_key_ptr + slot)  # copied by the sampling kernel (keys may live in host memory)
        thr_min = min_p_floor(m, temp, min_p, greedy)
        k1a, k2a = round_keys(key, tl.full([], TAIL_FIRST_ROUND, dtype=tl.int32))
        k1b, k2b = round_keys(key, tl.full([], TAIL_FIRST_ROUND + 1, dtype=tl.int32))
        cuts = lo + (m - lo) * ((cut_idx + 1).to(tl.float32) / (NUM_CUTS + 1))
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        best1 = tl.full([TILE], float("-inf"), dtype=tl.float32)
        best1_i = tl.full([TILE], vocab, dtype=tl.int32)
        best1_x = tl.full([TILE], float("-inf"), dtype=tl.float32)
        best2 = best1
        best2_i = best1_i
        best2_x = best1_x
        acc = tl.zeros([TILE, NUM_CUTS], dtype=tl.float32)
        end = tl.minimum(ch * CHUNK + CHUNK, vocab)
        for start in tl.range(ch * CHUNK, end, TILE, num_stages=STAGES):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < end, other=float("-inf"))
            keep = (x > lo) & (x >= thr_min)
            best1, best1_i, best1_x = race_step(best1, best1_i, best1_x, x, cols, keep, c, k1a, k2a, FAST)
            best2, best2_i, best2_x = race_step(best2, best2_i, best2_x, x, cols, keep, c, k1b, k2b, FAST)
            e = tl.where(x > lo, exp2((x - m) * c, FAST), 0.0)
            acc += tl.where(x[:, None] > cuts[None, :], e[:, None], 0.0)
        part = part_val_ptr + (slot * NCH + ch) * width
        s1, t1, x1 = race_result(best1, best1_i, best1_x, vocab)
        s2, t2, x2 = race_result(best2, best2_i, best2_x, vocab)
        tl.store(part, s1)
        tl.store(part + 1, x1)
        tl.store(part + 2, s2)
        tl.store(part + 3, x2)
        tl.store(part + 4 + cut_idx, tl.sum(acc, axis=0))
        tl.store(part_tok_ptr + (slot * NCH + ch) * 2, t1)
        tl.store(part_tok_ptr + (slot * NCH + ch) * 2 + 1, t2)
        tl.debug_barrier()  # every thread's stores before the release below
        if tl.atomic_add(arrive_ptr + slot, 1, sem="acq_rel") == n_chunks - 1:  # the row's last chunk: merge
            tl.atomic_xchg(arrive_ptr + slot, 0, sem="relaxed")
            valid = ch_idx < n_chunks
            parts = part_val_ptr + (slot * NCH + ch_idx) * width
            toks = part_tok_ptr + (slot * NCH + ch_idx) * 2
            masses = tl.load(parts[:, None] + 4 + cut_idx[None, :], mask=valid[:, None], other=0.0, volatile=True)
            kept = tl.sum(masses, axis=0) < top_p * z  # per cut point; the masses fall as the cuts rise
            kept_lo = tl.min(tl.where(kept, cuts, m), axis=0)  # the row max is always kept
            rejected_hi = tl.max(tl.where(kept, lo, cuts), axis=0)
            tok, w = _merged_candidate(parts, toks, valid, 0, vocab)
            if _kept(w, kept_lo, rejected_hi, row_ptr, vocab, m, c, top_p, z, BLOCK, FAST, ROW_STAGES) == 0:
                lo2 = tl.maximum(rejected_hi, w)
                r = tl.full([], TAIL_FIRST_ROUND + 1, dtype=tl.int32)
                if max_rounds > TAIL_FIRST_ROUND + 1:  # the second round's winner, drawn in the same pass
                    tok, w = _merged_candidate(parts, toks, valid, 1, vocab)
                    if _kept(w, kept_lo, rejected_hi, row_ptr, vocab, m, c, top_p, z, BLOCK, FAST, ROW_STAGES) == 1:
                        r = max_rounds + 1  # settled
                    else:
                        lo2 = tl.maximum(lo2, w)
                        r = r + 1
                if r <= max_rounds:
                    tok = reject_rounds(row_ptr, ids_ptr, vocab, m, z, lo2, r, max_rounds, key, temp, top_p, thr_min,
                                        c, inv_t, tl.arange(0, NUM_PIVOTS), tl.arange(0, BLOCK), BLOCK, NUM_PIVOTS,
                                        MAX_PASSES, FAST, ROW_STAGES)
            amax = tl.load(pend_val_ptr + slot * 4 + 3).to(tl.int32)  # a row with no finite logit: its argmax
            tl.store(out_ptr + row, tl.where(tok >= vocab, amax, tok).to(tl.int64))
    tl.debug_barrier()
    if tl.atomic_add(done_ptr, 1, sem="acq_rel") == nprog - 1:  # every program has read the count: reset
        tl.store(count_ptr, 0)
        tl.store(done_ptr, 0)


def reject_workspace(num_rows: int, vocab: int, device: torch.device, chunk: int = CHUNK) -> dict[str, torch.Tensor]:
    """The deferred-row list and the tail's partial results for up to ``num_rows`` rows:

    * ``rows`` int32 ``[num_rows]``, ``values`` float32 ``[num_rows, 4]`` (rejected logit, max, Z, argmax),
      ``keys`` int64 ``[num_rows]``: the list the sampling kernel appends to;
    * ``counters`` int32 ``[2]`` (listed rows, finished tail programs), ``arrive`` int32 ``[num_rows]``;
    * ``parts`` float32 ``[num_rows, NCH, 4 + NUM_CUTS]`` and ``part_tokens`` int32 ``[num_rows, NCH, 2]``.

    Counters start at zero and the tail kernel leaves them at zero; kept per (device, stream) and grown when
    a call needs more rows (:func:`blocks.sample.triton_search.per_stream`)."""

    def make(n: int, nch: int) -> dict:
        return {
            "nch": nch,
            "rows": torch.zeros(n, dtype=torch.int32, device=device),
            "values": torch.zeros(n, 4, dtype=torch.float32, device=device),
            "keys": torch.zeros(n, dtype=torch.int64, device=device),
            "counters": torch.zeros(2, dtype=torch.int32, device=device),
            "arrive": torch.zeros(n, dtype=torch.int32, device=device),
            "parts": torch.zeros(n, nch, 4 + NUM_CUTS, dtype=torch.float32, device=device),
            "part_tokens": torch.zeros(n, nch, 2, dtype=torch.int32, device=device),
        }

    return per_stream("reject tail", device, (num_rows, triton.next_power_of_2(triton.cdiv(vocab, chunk))), make)


def launch_reject_tail(logits, temperature, top_k, top_p, min_p, out, ws, ids, max_rounds, *, block: int,
                       num_pivots: int, fast: bool, stages: int, chunk: int = CHUNK) -> None:
    """Finish the rows the sampling kernel deferred into ``ws`` (see the module docstring), writing their
    tokens into ``out`` ``[num_rows]`` int64. ``ids`` is any int32 buffer (the whole-row rounds take token ids
    from the columns); ``chunk`` (a power of two, at least 16) is the logits a tail program reads."""
    num_rows, vocab = logits.shape
    items = num_rows * triton.cdiv(vocab, chunk)
    num_programs = min(items, max_programs(logits.device, 2)) if logits.is_cuda else min(items, 4)
    tile = min(512, chunk, triton.next_power_of_2(vocab))
    _reject_tail_kernel[(max(num_programs, 1),)](
        logits, logits.stride(0), vocab, temperature, top_k, top_p, min_p, out, ws["rows"], ws["values"], ws["keys"],
        ws["counters"], ws["counters"][1:], ws["arrive"], ws["parts"], ws["part_tokens"], ids, max_rounds,
        CHUNK=chunk, NCH=ws["nch"], NUM_CUTS=NUM_CUTS, TILE=tile, BLOCK=block, NUM_PIVOTS=num_pivots, MAX_PASSES=12,
        FAST=fast, STAGES=stages, ROW_STAGES=max(stages, ROW_STAGES), num_warps=8,
    )
