"""Triton: draws from a row's softmax by inverse CDF, for the sampler's top-p rows (and its rows with no filter).

The race (:mod:`blocks.sample.triton_race`) needs a hash and two logarithms per logit; on an H100 that made a top-p
row's first pass bound by instruction issue, not memory. An inverse-CDF draw needs only the row's mass, which a pass
can sum with one ``ex2`` a logit, and then a search along the row's cumulative mass in some fixed order.

The order used: lane ``l`` of a ``BLOCK``-wide tile owns the columns ``l, l + BLOCK, l + 2 BLOCK, ...``, lanes in
turn. One pass (:func:`softmax_pass`) keeps each lane's running max and its sum of ``2 ** ((x - lane max) * c)``
(``c = log2(e) / T``; one ``ex2`` a logit: either the old sum is rescaled or the new term is added). Then
(:func:`inverse_cdf_draws`), for each of ``K`` uniforms ``u``, the lane whose cumulative mass first passes
``u * Z`` is found among the lane sums in registers, and its ``ceil(vocab / BLOCK)`` logits are read again (a few
hundred bytes) to find the column inside it. So ``K`` draws from the unfiltered softmax cost one light pass.

The top-p check of a draw ``s`` (kept iff the mass strictly above ``x_s`` is below ``top_p * Z``) needs one more
pass (:func:`masses_above`), for all ``K`` draws at once (``Z`` comes from pass 1). Draws are independent, so the first kept one is a draw
from the kept set (rejection sampling); each is kept with probability at least ``top_p``, so all ``K`` are
rejected with probability at most ``(1 - top_p) ** K``.

Resolution: the uniforms carry 23 bits and the sums are float32, so a token's probability is honoured to about
``1e-7`` of the row's mass (a token below that may be drawn slightly too often or too rarely).
"""

from __future__ import annotations

import triton
import triton.language as tl

from blocks.sample.triton_chunks import chunk_cols, tile_offsets
from blocks.sample.triton_race import exp2, mix32

__all__ = ["DRAWS", "NUM_DRAWS", "softmax_pass", "inverse_cdf_draws", "masses_above", "draw_uniforms", "pick"]

DRAWS = 4  # draws a top-p row checks in its second pass (masses_above takes at most 4)
NUM_DRAWS = tl.constexpr(DRAWS)


@triton.jit
def softmax_pass(row_ptr, vocab, c, BLOCK: tl.constexpr, ROWS: tl.constexpr, FAST: tl.constexpr,
                 STAGES: tl.constexpr):
    """One pass over a row: per lane ``(max, first column of it, sum of 2 ** ((x - max) * c))``, each ``[BLOCK]``
    (``-inf``, 0 and 0 for a lane with no finite logit). Tiles are loaded as ``[ROWS, BLOCK // ROWS]`` (the layout of
    the sampling kernel's other pass-1 loop; :mod:`blocks.sample.triton_chunks`); lane ``l`` is element ``l`` of the
    flattened tile."""
    offs = tile_offsets(BLOCK, ROWS)
    m_vec = tl.full([ROWS, BLOCK // ROWS], float("-inf"), dtype=tl.float32)
    i_vec = tl.zeros([ROWS, BLOCK // ROWS], dtype=tl.int32)
    s_vec = tl.zeros([ROWS, BLOCK // ROWS], dtype=tl.float32)
    for start in tl.range(0, vocab, BLOCK, num_stages=STAGES):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
        upd = x > m_vec
        # one ex2: a new max rescales the old sum (and adds 1), else the new term is added; the floor keeps
        # -inf - -inf (a banned logit in a lane with no finite one yet) from making a NaN
        m_fin = tl.maximum(m_vec, -3.4028234663852886e38)
        f = exp2(tl.where(upd, m_fin - x, x - m_fin) * c, FAST)
        s_vec = tl.where(upd, s_vec * f + 1.0, s_vec + f)
        m_vec = tl.where(upd, x, m_vec)
        i_vec = tl.where(upd, cols, i_vec)
    return tl.reshape(m_vec, [BLOCK]), tl.reshape(i_vec, [BLOCK]), tl.reshape(s_vec, [BLOCK])


@triton.jit
def draw_uniforms(k1, k2, K: tl.constexpr):
    """``K`` uniforms in (0, 1) from a row's round keys: 23 hash bits as a mantissa, never 0 or 1."""
    h = mix32(mix32(tl.arange(0, K).to(tl.uint32) ^ k1) + k2)
    return ((h >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - (1.0 - 1.0 / 16777216.0)


@triton.jit
def inverse_cdf_draws(row_ptr, vocab, m_vec, s_vec, m, c, u, offs, BLOCK: tl.constexpr, NJ: tl.constexpr,
                      FAST: tl.constexpr):
    """``K = u.numel`` draws from the softmax ``2 ** ((x - m) * c)`` of a row, one per uniform ``u`` ``[K]``, from
    :func:`softmax_pass`'s lane state (``m`` = the row max): ``(tokens [K] int32, their logits [K], Z)``. ``NJ`` is
    a power of two ``>= ceil(vocab / BLOCK)``. A row with no finite logit gives token ``vocab`` and logit ``-inf``."""
    w = tl.where(m_vec > float("-inf"), s_vec * exp2((m_vec - m) * c, FAST), 0.0)
    cum = tl.cumsum(w, axis=0)
    z = tl.max(cum, axis=0)
    t = u * z
    last = tl.max(tl.where(w > 0.0, offs, -1), axis=0)
    lane = tl.minimum(tl.sum((cum[:, None] <= t[None, :]).to(tl.int32), axis=0), last)  # float rounding at the end
    lane = tl.maximum(lane, 0)
    at = offs[:, None] == lane[None, :]
    rest = tl.maximum(t - tl.sum(tl.where(at, (cum - w)[:, None], 0.0), axis=0), 0.0)
    jj = tl.arange(0, NJ)
    cols = lane[:, None] + jj[None, :] * BLOCK
    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
    e = tl.where(x > float("-inf"), exp2((x - m) * c, FAST), 0.0)
    pre = tl.cumsum(e, axis=1)
    j = tl.minimum(tl.sum((pre <= rest[:, None]).to(tl.int32), axis=1), tl.max(tl.where(e > 0.0, jj, -1), axis=1))
    ok = (last >= 0) & (j >= 0)
    tok = tl.where(ok, lane + j * BLOCK, vocab)
    x_tok = tl.max(tl.where(jj[None, :] == j[:, None], x, float("-inf")), axis=1)
    return tok, tl.where(ok, x_tok, float("-inf")), z


@triton.jit
def masses_above(row_ptr, vocab, m, c, cut0, cut1, cut2, cut3, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                 K: tl.constexpr, FAST: tl.constexpr, STAGES: tl.constexpr):
    """One pass over the row: the mass strictly above each of cut0, ..., cut3 for the first ``K <= 4`` cuts (the
    others 0), masses ``2 ** ((x - m) * c)``. One accumulator a cut (a ``[BLOCK, K]`` one spilled under the sampling
    kernel's 64-register cap).

    Not over pass 1's selected chunks (:mod:`blocks.sample.triton_chunks`), as top-k rows' second pass is: at the
    benchmark's top-p rows about half the chunks hold a value above the lowest of four draws, and that route took
    139 us a batch of 256 against 130 us for this one (H100, RESULTS.md session 10)."""
    a0 = tl.zeros([ROWS, BLOCK // ROWS], dtype=tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    n = tl.cdiv(vocab, BLOCK // ROWS)
    for g in tl.range(0, n, ROWS, num_stages=STAGES):
        cols, ok = chunk_cols(row_ptr, g, n, vocab, False, ROWS, BLOCK // ROWS)
        x = tl.load(row_ptr + cols, mask=ok, other=float("-inf"))
        e = tl.where(x > float("-inf"), exp2((x - m) * c, FAST), 0.0)
        a0 += tl.where(x > cut0, e, 0.0)
        if K > 1:
            a1 += tl.where(x > cut1, e, 0.0)
        if K > 2:
            a2 += tl.where(x > cut2, e, 0.0)
        if K > 3:
            a3 += tl.where(x > cut3, e, 0.0)
    return tl.sum(tl.sum(a0, axis=1), axis=0), tl.sum(tl.sum(a1, axis=1), axis=0), \
        tl.sum(tl.sum(a2, axis=1), axis=0), tl.sum(tl.sum(a3, axis=1), axis=0)


@triton.jit
def pick(v, idx, j):
    """Element ``j`` of the small vector ``v`` (``idx`` = ``tl.arange`` over it)."""
    return tl.sum(tl.where(idx == j, v, 0), axis=0)
