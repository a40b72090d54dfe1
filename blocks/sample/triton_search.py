"""Triton building blocks shared by the threshold and sampling kernels: exact top-k / top-p threshold
searches in logit space over a row (or a compacted candidate list), without sorting.

Both searches keep an interval ``[lo, hi)`` of logit values and narrow it by counting, in one pass over
the ``n`` values, how many are ``>=`` each of ``NUM_PIVOTS`` pivots spread over the interval (and their
probability mass ``exp((x - m) / T)``):

* :func:`topk_search`: invariant ``count(x >= lo) >= k > count(x >= hi)``; it stops when exactly ``k`` are
  ``>= lo``, when the interval holds at most one value, or when it cannot be split any more (ties at the
  threshold are all kept, as transformers keeps them);
* :func:`topp_search`: the same on the mass, ``mass(x >= lo) >= target > mass(x >= hi)``.

After ``max_passes`` passes ``lo`` is a lower bound (a superset is kept). :func:`lane_bound` gives a
starting ``lo`` from per-lane maxima alone (a subset of the row, so any count or mass reached by them is
reached by the row), without a memory pass.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def search_pass(src, n, m, inv_t, lo, hi, piv_idx, offs, BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """Counts and masses of the values >= each of NUM_PIVOTS pivots ``lo + (hi - lo) * j / NUM_PIVOTS``
    (the first pivot is ``lo`` itself, so its exact count and mass come back too)."""
    pivots = lo + (hi - lo) * (piv_idx.to(tl.float32) / NUM_PIVOTS)
    pivots = tl.where(piv_idx == 0, lo, pivots)
    cnt = tl.zeros([NUM_PIVOTS], dtype=tl.int32)
    mass = tl.zeros([NUM_PIVOTS], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + offs
        valid = cols < n
        x = tl.load(src + cols, mask=valid, other=float("-inf"))
        e = tl.where(valid, tl.exp((x - m) * inv_t), 0.0)
        ge = x[:, None] >= pivots[None, :]
        cnt += tl.sum(ge.to(tl.int32), axis=0)
        mass += tl.sum(tl.where(ge, e[:, None], 0.0), axis=0)
    return pivots, cnt, mass


@triton.jit
def lane_bound(m_vec, lo, hi, need, m, inv_t, piv_idx, USE_MASS: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """A lower bound of the threshold from the per-lane maxima ``m_vec`` alone (registers, no memory).

    If ``need`` of them (count, or mass when USE_MASS) are ``>= t``, the whole row has at least as many
    and the true threshold is ``>= t``. Returns ``lo`` unchanged when no pivot qualifies.
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
def topk_search(src, n, m, inv_t, lo, hi, count_lo, top_k, max_passes, piv_idx, offs,
                BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """Top-k threshold: ``(lo, mass of x >= lo)``; ``count_lo`` = ``count(x >= lo)`` at the start (or more)."""
    cnt_lo = count_lo
    cnt_hi = 0 * count_lo
    mass_lo = tl.full([], float("inf"), dtype=tl.float32)
    done = tl.zeros([], dtype=tl.int32)
    passes = 0
    while (done == 0) & (passes < max_passes):
        pivots, cnt, mass = search_pass(src, n, m, inv_t, lo, hi, piv_idx, offs, BLOCK, NUM_PIVOTS)
        ok = cnt >= top_k
        lo = tl.max(tl.where(ok, pivots, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, pivots), axis=0)
        cnt_lo = tl.min(tl.where(ok, cnt, cnt_lo), axis=0)
        mass_lo = tl.min(tl.where(ok, mass, mass_lo), axis=0)  # masses fall as pivots rise: the one at lo
        cnt_hi = tl.max(tl.where(ok, cnt_hi, cnt), axis=0)
        splittable = lo + (hi - lo) * (1.0 / NUM_PIVOTS) > lo
        done = ((cnt_lo == top_k) | (cnt_lo - cnt_hi <= 1) | (splittable == 0)).to(tl.int32)
        passes += 1
    return lo, mass_lo


@triton.jit
def topp_search(src, n, m, inv_t, lo, hi, target, max_passes, piv_idx, offs,
                BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """Top-p threshold: the largest ``lo`` with ``mass(x >= lo) >= target`` (``lo`` must satisfy it)."""
    cnt_lo = tl.full([], 2147483647, dtype=tl.int32)
    cnt_hi = tl.zeros([], dtype=tl.int32)
    done = tl.zeros([], dtype=tl.int32)
    passes = 0
    while (done == 0) & (passes < max_passes):
        pivots, cnt, mass = search_pass(src, n, m, inv_t, lo, hi, piv_idx, offs, BLOCK, NUM_PIVOTS)
        ok = mass >= target
        lo = tl.max(tl.where(ok, pivots, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, pivots), axis=0)
        cnt_lo = tl.min(tl.where(ok, cnt, cnt_lo), axis=0)
        cnt_hi = tl.max(tl.where(ok, cnt_hi, cnt), axis=0)
        splittable = lo + (hi - lo) * (1.0 / NUM_PIVOTS) > lo
        done = ((cnt_lo - cnt_hi <= 1) | (splittable == 0)).to(tl.int32)
        passes += 1
    return lo
