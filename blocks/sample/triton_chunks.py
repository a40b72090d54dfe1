"""Triton: per-chunk maxima of a row, so that the sampling kernel's second pass over a top-k or min-p row reads only
the chunks that can hold what it looks for.

That pass gathers the logits ``>= bound`` (a lower bound of the top-k threshold, or the min-p floor). Pass 1 reads
every logit anyway, so it also keeps the max of each *chunk* of ``CW = BLOCK // ROWS`` consecutive logits (a tile
of ``BLOCK`` is loaded as ``[ROWS, CW]``, so a chunk's max is a reduction inside one warp: 16 warps, 128 logits a
chunk at the default tile of 2048), and the second pass reads only the chunks whose max passes the bound
(:func:`select_chunks`, then :func:`chunk_cols`). The answer is the same as reading the whole row: a chunk whose
max fails the bound holds no value that passes it.

How many chunks pass depends on the logits: for the sampler benchmark's rows (Gaussian logits, 128k vocabulary,
top-k 50 or min-p 0.05) a few dozen of about 1,000; for a flat distribution all of them, and the pass then costs
what a whole-row pass did. H100, batch 256 x 128256 (benchmarks/RESULTS.md, session 10): a batch of top-k 50 rows
140 -> 108 us, of min-p rows 133 -> 117 us; pass 1's reduction costs greedy rows in a mixed batch about 9 us.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["CHUNK_ROWS", "ROWS", "tile_offsets", "chunk_max_init", "chunk_max_update", "store_chunk_max",
           "select_chunks", "chunk_cols"]

CHUNK_ROWS = 16  # chunks a tile: one a warp at the sampling kernel's 16 warps
ROWS = tl.constexpr(CHUNK_ROWS)


@triton.jit
def tile_offsets(BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """``[ROWS, BLOCK // ROWS]`` column offsets of a tile: row ``r`` is the tile's chunk ``r``."""
    return tl.arange(0, ROWS)[:, None] * (BLOCK // ROWS) + tl.arange(0, BLOCK // ROWS)[None, :]


@triton.jit
def chunk_max_init(ROWS: tl.constexpr, NT: tl.constexpr):
    """The running chunk maxima of a pass: ``[ROWS, NT]``, column ``t`` for tile ``t`` (``NT >= `` the tiles)."""
    return tl.full([ROWS, NT], float("-inf"), dtype=tl.float32)


@triton.jit
def chunk_max_update(cm, t, x, NT: tl.constexpr):
    """Put the maxima of the ``ROWS`` chunks of tile ``t`` (``x`` ``[ROWS, CW]``) into column ``t`` of ``cm``. Kept in
    registers, in the layout of the reduction: a store per tile needs a layout conversion through shared memory, a
    barrier every tile. (Callers branch outside their loops: a branch inside a pipelined loop stopped its
    pipelining on an H100, greedy rows 80 -> 103 us a batch.)"""
    return tl.where(tl.arange(0, NT)[None, :] == t, tl.max(x, axis=1, keep_dims=True), cm)


@triton.jit
def store_chunk_max(cmax_ptr, cm, ROWS: tl.constexpr, NT: tl.constexpr):
    """Store the running maxima ``cm`` ``[ROWS, NT]``: chunk ``t * ROWS + r`` at ``cmax_ptr[t * ROWS + r]``."""
    tl.store(cmax_ptr + tl.arange(0, NT)[None, :] * ROWS + tl.arange(0, ROWS)[:, None], cm)


@triton.jit
def select_chunks(cmax_ptr, clist_ptr, n_chunks, bound, NCH: tl.constexpr):
    """Write the ids of the chunks whose max is ``>= bound`` to ``clist_ptr``, in order, and return how many there
    are. ``NCH``: a power of two ``>= n_chunks``. Barriers on both sides: the maxima were stored by other threads,
    and the list is read by others."""
    tl.debug_barrier()
    ch = tl.arange(0, NCH)
    valid = ch < n_chunks
    sel = valid & (tl.load(cmax_ptr + ch, mask=valid, other=float("-inf")) >= bound)
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(clist_ptr + pos, ch, mask=sel)
    tl.debug_barrier()
    return tl.sum(sel.to(tl.int32), axis=0)


@triton.jit
def chunk_cols(clist_ptr, g, n, vocab, FROM_LIST: tl.constexpr, ROWS: tl.constexpr, CW: tl.constexpr):
    """Columns ``[ROWS, CW]`` of items ``g .. g + ROWS`` of ``n`` chunks (the chunk ids listed at ``clist_ptr`` when
    FROM_LIST, else chunks ``g ..`` themselves) and the mask of those inside the row."""
    item = g + tl.arange(0, ROWS)
    if FROM_LIST:
        ch = tl.load(clist_ptr + item, mask=item < n, other=0)
    else:
        ch = item
    cols = ch[:, None] * CW + tl.arange(0, CW)[None, :]
    return cols, (item < n)[:, None] & (cols < vocab)
