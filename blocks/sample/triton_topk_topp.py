"""Triton kernel: per-row top-k / top-p / min-p thresholds (``keep logits >= threshold``), no sort.

Used where the filtered distribution itself is wanted (``processed_logprobs``, ``processed_logits``);
sampling does not need the threshold and runs :mod:`blocks.sample.triton_sample` instead.

One program walks whole rows (a persistent loop over rows). Per row:

1. one pass for the max, the smallest finite logit, the number of finite logits and
   ``Z = sum(exp((x - max) / T))``, keeping the per-lane maxima in registers;
2. a lower bound ``low`` of the threshold from the lane maxima alone (:func:`lane_bound`), or the
   min-p cut for min-p-only rows;
3. one pass compacting the logits ``>= low`` (values and token ids) into the program's scratch of
   ``candidates`` slots; when they fit, every later pass reads the scratch (a few KB) instead of
   the 512 KB row, otherwise the row (same answer either way);
4. the exact top-k, then top-p (on the top-k survivors' mass) searches of
   :mod:`blocks.sample.triton_search`; min-p as ``max + T * log(min_p)`` in closed form.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (fp32) and compiled on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blocks.sample.triton_search import (
    check_rows,
    lane_bound,
    launch_layout,
    row_params,
    threshold_search,
)

__all__ = ["triton_thresholds", "compact_candidates"]


@triton.jit
def compact_candidates(row_ptr, vocab, low, cval, cidx, offs, BLOCK: tl.constexpr, CAP: tl.constexpr):
    """Copy the logits ``>= low`` and their token ids into ``cval`` / ``cidx`` (in token order, at most
    ``CAP``); returns how many there are (more than ``CAP`` means the list is incomplete)."""
    tl.debug_barrier()
    n_cand = 0 * vocab
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
        sel = (cols < vocab) & (x >= low)
        pos = n_cand + tl.cumsum(sel.to(tl.int32), axis=0) - 1
        fits = sel & (pos < CAP)
        tl.store(cval + pos, x, mask=fits)
        tl.store(cidx + pos, cols, mask=fits)
        n_cand += tl.sum(sel.to(tl.int32), axis=0)
    tl.debug_barrier()
    return n_cand


@triton.jit(do_not_specialize=["num_rows"])  # the batch size changes every step
def _threshold_kernel(
    logits_ptr,
    stride_row,
    vocab,
    num_rows,
    temp_ptr,
    topk_ptr,
    topp_ptr,
    minp_ptr,
    thr_ptr,
    cand_val_ptr,
    cand_idx_ptr,
    BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    MAX_PASSES: tl.constexpr,
    CAP: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    piv_idx = tl.arange(0, NUM_PIVOTS)
    cval = cand_val_ptr + pid * CAP
    cidx = cand_idx_ptr + pid * CAP
    for row in range(pid, num_rows, nprog):
        row_ptr = logits_ptr + (tl.zeros([], dtype=tl.int64) + row) * stride_row
        temp, greedy, inv_t, top_k, top_p, min_p = row_params(row, temp_ptr, topk_ptr, topp_ptr, minp_ptr)

        # Pass 1: max, smallest finite logit, number of finite logits, and the softmax normaliser
        # (per-lane online rescaling).
        m_vec = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        mn_vec = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        z_vec = tl.zeros([BLOCK], dtype=tl.float32)
        nfin_vec = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
            fin = x > float("-inf")
            new_m = tl.maximum(x, m_vec)
            finite = new_m > float("-inf")
            safe_m = tl.where(finite, new_m, 0.0)
            scale = tl.where(finite, tl.exp((m_vec - safe_m) * inv_t), 0.0)
            add = tl.where(finite, tl.exp((x - safe_m) * inv_t), 0.0)
            z_vec = z_vec * scale + add
            m_vec = new_m
            mn_vec = tl.minimum(mn_vec, tl.where(fin, x, float("inf")))
            nfin_vec += fin.to(tl.int32)
        m = tl.max(m_vec, axis=0)
        z = tl.sum(tl.where(m_vec > float("-inf"), z_vec * tl.exp((m_vec - m) * inv_t), 0.0), axis=0)
        mn = tl.min(mn_vec, axis=0)
        nfin = tl.sum(nfin_vec, axis=0)
        # An upper end with count 0 and mass 0: a little above the max.
        hi_top = m + tl.maximum(tl.abs(m) * 1e-6, 1e-6)
        thr_min = tl.where(min_p > 0.0, m + tl.log(tl.maximum(min_p, 1e-30)) * temp, float("-inf"))
        need_k = (greedy == 0) & (top_k > 0) & (top_k < nfin)
        need_p = (greedy == 0) & (top_p < 1.0)

        low = mn
        if need_k:
            low = lane_bound(m_vec, mn, hi_top, top_k, m, inv_t, piv_idx, False, NUM_PIVOTS)
        elif need_p:
            low = lane_bound(m_vec, mn, hi_top, top_p * z, m, inv_t, piv_idx, True, NUM_PIVOTS)
        else:
            low = tl.maximum(mn, thr_min)

        # Pass 2 (CAP > 0): the candidates >= low into the scratch; later passes read them if they fit.
        src = row_ptr
        n_src = vocab
        if CAP > 0:  # noqa: SIM102 (a compile-time branch around a runtime one)
            if (need_k | need_p) & (low > mn):  # no bound (e.g. a flat top-p row): skip the useless pass
                n_cand = compact_candidates(row_ptr, vocab, low, cval, cidx, offs, BLOCK, CAP)
                if n_cand <= CAP:
                    src = cval
                    n_src = n_cand

        lo = low
        mass_lo = z
        if need_k:
            lo, mass_lo = threshold_search(src, n_src, m, inv_t, low, hi_top, top_k, MAX_PASSES, piv_idx, offs,
                                           BLOCK, NUM_PIVOTS, False)
        if need_p:
            target = top_p * mass_lo
            lane_max = tl.where(m_vec >= lo, m_vec, float("-inf"))
            lo = lane_bound(lane_max, lo, hi_top, target, m, inv_t, piv_idx, True, NUM_PIVOTS)
            lo, _ = threshold_search(src, n_src, m, inv_t, lo, hi_top, target, MAX_PASSES, piv_idx, offs, BLOCK,
                                     NUM_PIVOTS, True)
        thr = tl.maximum(tl.where(need_k | need_p, lo, float("-inf")), thr_min)
        thr = tl.where(greedy, float("-inf"), thr)
        tl.store(thr_ptr + row, thr)


def triton_thresholds(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    *,
    block: int = 1024,
    num_pivots: int = 16,
    num_programs: int | None = None,
    num_warps: int = 8,
    candidates: int = 4096,
) -> torch.Tensor:
    """Thresholds of the top-k / top-p / min-p filter: keep ``logits >= threshold``.

    Args:
        logits: ``[num_rows, vocab]`` float32, unit stride along the vocabulary (not modified).
        temperature: ``[num_rows]`` float32 (0 = greedy). top_k: ``[num_rows]`` int32/int64 (0 = off).
        top_p, min_p: ``[num_rows]`` float32 (1 and 0 = off).
        block, num_pivots: tile width (capped at the vocabulary's next power of two) and pivots per
            search pass (powers of two).
        num_programs: persistent programs (default: one per row, at most 4 per SM on CUDA).
        candidates: scratch slots per program for the compacted logits (0 = always read whole rows).

    Returns:
        ``threshold [num_rows]`` float32; greedy rows get ``-inf``.
    """
    check_rows(logits)
    num_rows, vocab = logits.shape
    thr = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return thr
    block, num_programs, cap, cand_val, cand_idx, _ = launch_layout(logits, block, num_programs, candidates)
    _threshold_kernel[(num_programs,)](
        logits, logits.stride(0), vocab, num_rows, temperature, top_k, top_p, min_p, thr, cand_val, cand_idx,
        BLOCK=block, NUM_PIVOTS=num_pivots, MAX_PASSES=12, CAP=cap, num_warps=num_warps,
    )
    return thr
