"""Triton kernel: per-row top-k / top-p / min-p threshold and exponential-race sampling, no sort.

One program walks whole rows (a persistent loop over rows). Per row:

1. one pass for the max, the first argmax (the greedy answer), the smallest finite logit and
   ``Z = sum(exp((x - max) / T))``, keeping the per-lane maxima in registers;
2. a lower bound ``low`` of the threshold from the lane maxima alone (they are a subset of the
   row: if ``k`` of them, or mass ``top_p * Z``, lie above ``t``, so does the row), or the min-p
   cut for min-p-only rows;
3. one pass compacting the logits ``>= low`` (values and token ids) into the program's scratch of
   ``candidates`` slots; when they fit, every later pass reads the scratch (a few KB) instead of
   the 512 KB row, otherwise the row (same answer either way);
4. top-k: a multi-pivot search over the logit range. Each pass counts, for ``NUM_PIVOTS`` pivots
   spread evenly over the live interval ``[lo, hi)`` (the first at ``lo``), how many logits are
   ``>=`` each pivot (and their probability mass), then narrows the interval to the two
   neighbouring pivots that bracket ``k``. It stops when the interval holds at most one logit, when
   exactly ``k`` logits are ``>= lo``, or when the interval cannot be split any more (ties: all kept,
   as transformers does), so ``logits >= lo`` is exactly the top-k set (after ``MAX_PASSES``
   passes, a superset);
5. top-p: the same search on the mass, between the top-k threshold and the max, for
   ``top_p * Z_k`` (``Z_k`` = mass of the top-k survivors);
6. min-p: ``max + T * log(min_p)`` in closed form;
7. sampling (when ``DO_SAMPLE``): ``argmax((x - max) / T - log(E))`` over the kept logits with
   ``E = -log(U)``, ``U`` from Philox keyed by a per-row 64-bit key and the token id (drawn on the
   host from the request's own generator, so a seeded request is reproducible whatever the batch,
   and compacted or not gives the same token).

So a row whose candidates fit reads the logits twice from memory; a flat top-p-only row (no useful
lane bound) reads them once per search pass, about four to six times at vocabulary 128k
(each pass divides the live interval by ``NUM_PIVOTS``).

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (fp32) and compiled on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_filter_and_sample"]


@triton.jit
def _search_pass(row_ptr, vocab, m, inv_t, lo, hi, piv_idx, offs, BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """Counts and masses of the logits >= each of NUM_PIVOTS pivots ``lo + (hi - lo) * j / NUM_PIVOTS``
    (the first pivot is ``lo`` itself, so its exact count and mass come back too)."""
    pivots = lo + (hi - lo) * (piv_idx.to(tl.float32) / NUM_PIVOTS)
    pivots = tl.where(piv_idx == 0, lo, pivots)
    cnt = tl.zeros([NUM_PIVOTS], dtype=tl.int32)
    mass = tl.zeros([NUM_PIVOTS], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        valid = cols < vocab
        x = tl.load(row_ptr + cols, mask=valid, other=float("-inf"))
        e = tl.where(valid, tl.exp((x - m) * inv_t), 0.0)
        ge = x[:, None] >= pivots[None, :]
        cnt += tl.sum(ge.to(tl.int32), axis=0)
        mass += tl.sum(tl.where(ge, e[:, None], 0.0), axis=0)
    return pivots, cnt, mass


@triton.jit
def _lane_bound(m_vec, lo, hi, need, m, inv_t, piv_idx, USE_MASS: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """A lower bound of the threshold from the per-lane maxima alone (registers, no memory pass).

    The lane maxima are a subset of the row, so if ``need`` of them (count, or mass when USE_MASS)
    are ``>= t``, the whole row has at least as many and the true threshold is ``>= t``. Returns
    ``lo`` unchanged when no pivot qualifies.
    """
    best = lo
    for _ in range(3):
        pivots = lo + (hi - lo) * ((piv_idx + 1).to(tl.float32) / (NUM_PIVOTS + 1))
        ge = m_vec[:, None] >= pivots[None, :]
        if USE_MASS:
            e = tl.where(m_vec > float("-inf"), tl.exp((m_vec - m) * inv_t), 0.0)
            have = tl.sum(tl.where(ge, e[:, None], 0.0), axis=0)
            ok = have >= need
        else:
            ok = tl.sum(ge.to(tl.int32), axis=0) >= need
        new_lo = tl.max(tl.where(ok, pivots, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, pivots), axis=0)
        lo = new_lo
        best = tl.maximum(best, new_lo)
    return best


@triton.jit
def _race_pass(val_ptr, idx_ptr, n, from_buf, thr, m, inv_t, seed, vocab, offs, BLOCK: tl.constexpr):
    """Exponential race over ``n`` logits (a row, or the compacted candidates with their token ids)."""
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        j = start + offs
        valid = j < n
        x = tl.load(val_ptr + j, mask=valid, other=float("-inf"))
        use_idx = (offs * 0 + from_buf) != 0
        cols = tl.where(use_idx, tl.load(idx_ptr + j, mask=valid & use_idx, other=0), j)
        keep = valid & (x >= thr)
        u = tl.rand(seed, cols)
        # 1e-30, not 1e-38: a literal below fp32's smallest normal (1.18e-38) is typed fp64 by older
        # Triton (3.6), which turns the loop-carried ``best`` into fp64 and fails to compile
        noise = -tl.log(tl.maximum(u, 1e-30))
        score = tl.where(keep, (x - m) * inv_t - tl.log(tl.maximum(noise, 1e-30)), float("-inf"))
        upd = score > best
        best = tl.where(upd, score, best)
        best_i = tl.where(upd, cols, best_i)
    top = tl.max(best, axis=0)
    return tl.min(tl.where(best == top, best_i, vocab), axis=0)


@triton.jit
def _filter_sample_kernel(
    logits_ptr,
    stride_row,
    vocab,
    num_rows,
    temp_ptr,
    topk_ptr,
    topp_ptr,
    minp_ptr,
    key_ptr,
    thr_ptr,
    out_ptr,
    cand_val_ptr,
    cand_idx_ptr,
    BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    MAX_PASSES: tl.constexpr,
    DO_SAMPLE: tl.constexpr,
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
        temp = tl.load(temp_ptr + row)
        greedy = temp <= 0.0
        inv_t = tl.where(greedy, 1.0, 1.0 / tl.maximum(temp, 1e-30))
        top_k = tl.load(topk_ptr + row).to(tl.int32)
        top_p = tl.load(topp_ptr + row)
        min_p = tl.load(minp_ptr + row)

        # Pass 1: max, first argmax, smallest finite logit, number of finite logits, and the softmax
        # normaliser (per-lane online rescaling).
        m_vec = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        mn_vec = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        i_vec = tl.zeros([BLOCK], dtype=tl.int32)
        z_vec = tl.zeros([BLOCK], dtype=tl.float32)
        nfin_vec = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
            fin = x > float("-inf")
            upd = x > m_vec
            new_m = tl.where(upd, x, m_vec)
            finite = new_m > float("-inf")
            safe_m = tl.where(finite, new_m, 0.0)
            scale = tl.where(finite, tl.exp((m_vec - safe_m) * inv_t), 0.0)
            add = tl.where(finite, tl.exp((x - safe_m) * inv_t), 0.0)
            z_vec = z_vec * scale + add
            i_vec = tl.where(upd, cols, i_vec)
            m_vec = new_m
            mn_vec = tl.minimum(mn_vec, tl.where(fin, x, float("inf")))
            nfin_vec += fin.to(tl.int32)
        m = tl.max(m_vec, axis=0)
        amax = tl.min(tl.where(m_vec == m, i_vec, vocab), axis=0)
        z = tl.sum(tl.where(m_vec > float("-inf"), z_vec * tl.exp((m_vec - m) * inv_t), 0.0), axis=0)
        mn = tl.min(mn_vec, axis=0)
        nfin = tl.sum(nfin_vec, axis=0)
        # An upper end with count 0 and mass 0: a little above the max.
        hi_top = m + tl.maximum(tl.abs(m) * 1e-6, 1e-6)
        thr_min = tl.where(min_p > 0.0, m + tl.log(tl.maximum(min_p, 1e-30)) * temp, float("-inf"))
        need_k = (greedy == 0) & (top_k > 0) & (top_k < nfin)
        need_p = (greedy == 0) & (top_p < 1.0)

        # A lower bound of every threshold searched below, from the lane maxima alone (no memory pass).
        low = mn
        if need_k:
            low = _lane_bound(m_vec, mn, hi_top, top_k, m, inv_t, piv_idx, False, NUM_PIVOTS)
        elif need_p:
            low = _lane_bound(m_vec, mn, hi_top, top_p * z, m, inv_t, piv_idx, True, NUM_PIVOTS)
        else:
            low = tl.maximum(mn, thr_min)

        # Pass 2 (CAP > 0): compact the logits >= low into this program's scratch. When they fit, every
        # later pass reads them (a few KB, cache-resident) instead of the whole row.
        src = row_ptr
        n_src = vocab
        from_buf = tl.zeros([], dtype=tl.int32)  # 1 when the candidates are read from the scratch
        if CAP > 0:  # noqa: SIM102 (a compile-time branch around a runtime one)
            if (greedy == 0) & (low > mn):  # no bound (e.g. a flat top-p row): skip the useless pass
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
                if n_cand <= CAP:
                    src = cval
                    n_src = n_cand
                    from_buf = tl.full([], 1, dtype=tl.int32)

        # Top-k search in value space: invariant count(>= lo) >= k > count(>= hi).
        lo = tl.where(need_k, low, mn)
        hi = hi_top
        cnt_lo = nfin
        cnt_hi = 0 * nfin
        mass_lo = z
        done_k = need_k == 0
        passes = 0
        while (done_k == 0) & (passes < MAX_PASSES):
            pivots, cnt, mass = _search_pass(src, n_src, m, inv_t, lo, hi, piv_idx, offs, BLOCK, NUM_PIVOTS)
            ok = cnt >= top_k
            lo = tl.max(tl.where(ok, pivots, lo), axis=0)
            hi = tl.min(tl.where(ok, hi, pivots), axis=0)
            cnt_lo = tl.min(tl.where(ok, cnt, cnt_lo), axis=0)
            mass_lo = tl.min(tl.where(ok, mass, mass_lo), axis=0)
            cnt_hi = tl.max(tl.where(ok, cnt_hi, cnt), axis=0)
            splittable = lo + (hi - lo) * (1.0 / NUM_PIVOTS) > lo
            done_k = (cnt_lo == top_k) | (cnt_lo - cnt_hi <= 1) | (splittable == 0)
            passes += 1

        # Top-p search on the survivors: invariant mass(>= lo) >= target > mass(>= hi).
        target = top_p * mass_lo
        if need_p:
            lo = tl.maximum(lo, low)
            lane_max = tl.where(m_vec >= lo, m_vec, float("-inf"))
            lo = _lane_bound(lane_max, lo, hi_top, target, m, inv_t, piv_idx, True, NUM_PIVOTS)
        hi = hi_top
        cnt_hi = 0 * nfin
        done_p = need_p == 0
        passes = 0
        while (done_p == 0) & (passes < MAX_PASSES):
            pivots, cnt, mass = _search_pass(src, n_src, m, inv_t, lo, hi, piv_idx, offs, BLOCK, NUM_PIVOTS)
            ok = mass >= target
            lo = tl.max(tl.where(ok, pivots, lo), axis=0)
            hi = tl.min(tl.where(ok, hi, pivots), axis=0)
            cnt_lo = tl.min(tl.where(ok, cnt, cnt_lo), axis=0)
            cnt_hi = tl.max(tl.where(ok, cnt_hi, cnt), axis=0)
            splittable = lo + (hi - lo) * (1.0 / NUM_PIVOTS) > lo
            done_p = (cnt_lo - cnt_hi <= 1) | (splittable == 0)
            passes += 1

        thr = tl.maximum(tl.where(need_k | need_p, lo, float("-inf")), thr_min)
        thr = tl.where(greedy, float("-inf"), thr)
        tl.store(thr_ptr + row, thr)

        if DO_SAMPLE:
            token = amax.to(tl.int64)
            if temp > 0.0:
                seed = tl.load(key_ptr + row)
                token = _race_pass(src, cidx, n_src, from_buf, thr, m, inv_t, seed, vocab, offs, BLOCK).to(tl.int64)
            tl.store(out_ptr + row, token)


def triton_filter_and_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    *,
    keys: torch.Tensor | None = None,
    block: int = 1024,
    num_pivots: int = 16,
    num_programs: int | None = None,
    num_warps: int = 8,
    candidates: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Thresholds of the top-k / top-p / min-p filter and, when ``keys`` is given, sampled tokens.

    Args:
        logits: ``[num_rows, vocab]`` float32, unit stride along the vocabulary (not modified).
        temperature: ``[num_rows]`` float32 (0 = greedy). top_k: ``[num_rows]`` int32/int64 (0 = off).
        top_p, min_p: ``[num_rows]`` float32 (1 and 0 = off).
        keys: ``[num_rows]`` int64 Philox keys, one per row and step; None = thresholds only.
        block, num_pivots: tile width (capped at the vocabulary's next power of two) and pivots per
            search pass (powers of two).
        num_programs: persistent programs (default: one per row, at most 4 per SM on CUDA).
        candidates: scratch slots per program for the compacted logits (0 = always read whole rows).

    Returns:
        ``(threshold [num_rows] float32, tokens [num_rows] int64 or None)``; keep ``logits >= threshold``.
        Greedy rows get ``-inf`` and their first argmax.
    """
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a 2-D float32 tensor, got {tuple(logits.shape)} {logits.dtype}.")
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary dimension.")
    num_rows, vocab = logits.shape
    thr = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    do_sample = keys is not None
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device) if do_sample else thr
    key_arg = keys if do_sample else thr
    if num_rows == 0:
        return thr, (out if do_sample else None)
    block = max(16, min(block, triton.next_power_of_2(vocab)))  # small vocabularies: a narrower tile
    if num_programs is None:
        num_programs = num_rows
        if logits.is_cuda:
            num_programs = min(num_rows, 4 * torch.cuda.get_device_properties(logits.device).multi_processor_count)
    if candidates < 0:
        raise ValueError(f"candidates must be non-negative, got {candidates}.")
    cap = triton.next_power_of_2(candidates) if candidates else 0
    cand_val = torch.empty(num_programs * max(cap, 1), dtype=torch.float32, device=logits.device)
    cand_idx = torch.empty(num_programs * max(cap, 1), dtype=torch.int32, device=logits.device)
    _filter_sample_kernel[(num_programs,)](
        logits,
        logits.stride(0),
        vocab,
        num_rows,
        temperature,
        top_k,
        top_p,
        min_p,
        key_arg,
        thr,
        out,
        cand_val,
        cand_idx,
        BLOCK=block,
        NUM_PIVOTS=num_pivots,
        MAX_PASSES=12,
        DO_SAMPLE=do_sample,
        CAP=cap,
        num_warps=num_warps,
    )
    return thr, (out if do_sample else None)
