"""Triton building blocks of the exponential race, shared by the sampling kernel and its rejection tail:
the noise (a counter-based hash of the row's key, the round and the token id, with hardware ``lg2`` /
``ex2`` on CUDA), a row's race over a value range, and the per-round keys.

``U`` for token ``j`` in round ``r`` is a function of ``(key, r, j)`` alone, so a row's draw does not depend
on how its logits are split among programs or on the rows beside it.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["mix32", "log2", "exp2", "race_score", "race_step", "race_result", "race", "round_keys"]


@triton.jit
def mix32(h):
    """A 32-bit integer finaliser (two multiply-xorshift rounds): every input bit flips every output bit
    with probability ~1/2."""
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def _mufu(x, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def log2(x, FAST: tl.constexpr):
    """``log2(x)``; FAST (CUDA) uses the hardware approximation (one MUFU op; ``tl.log`` compiles to a
    ~30-instruction libdevice routine, which made the race compute-bound)."""
    return _mufu(x, "lg2.approx.f32 $0, $1;") if FAST else tl.log2(x)


@triton.jit
def exp2(x, FAST: tl.constexpr):
    """``2 ** x``; FAST (CUDA) uses the hardware approximation."""
    return _mufu(x, "ex2.approx.f32 $0, $1;") if FAST else tl.exp2(x)


@triton.jit
def race_score(x, cols, c, k1, k2, FAST: tl.constexpr):
    """The race score of logits ``x`` with token ids ``cols``: ``x / T - log(E)`` in base 2 (``c`` =
    ``log2(e) / T``; the constant ``log2(ln 2)`` is dropped): ``x * c - log2(-log2(U))``. ``U`` takes 23
    hash bits as the mantissa of a float in [1, 2), minus 1, plus 2^-24: in (0, 1), never 0 or 1."""
    h = mix32(mix32(cols.to(tl.uint32) ^ k1) + k2)
    u = ((h >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - (1.0 - 1.0 / 16777216.0)
    return x * c - log2(-log2(u, FAST), FAST)


@triton.jit
def race_step(best, best_i, best_x, x, cols, keep, c, k1, k2, FAST: tl.constexpr):
    """One tile of a race: the lane-wise best score, its token and its logit, over the ``keep`` entries."""
    score = tl.where(keep, race_score(x, cols, c, k1, k2, FAST), float("-inf"))
    win = score > best
    return tl.where(win, score, best), tl.where(win, cols, best_i), tl.where(win, x, best_x)


@triton.jit
def race_result(best, best_i, best_x, BIG):
    """``(score, token, logit)`` of a lane-wise race state: the best score, the lowest token among ties
    (``BIG`` when no lane has a finite score)."""
    top = tl.max(best, axis=0)
    tok = tl.min(tl.where(best == top, best_i, BIG), axis=0)
    return top, tok, tl.max(tl.where((best == top) & (best_i == tok), best_x, float("-inf")), axis=0)


@triton.jit
def race(src, ids, n, FROM_IDS: tl.constexpr, lo, strict, thr_min, c, k1, k2, offs, BIG, BLOCK: tl.constexpr,
         FAST: tl.constexpr, STAGES: tl.constexpr = 1):
    """Exponential race over the values of ``src[0:n)`` in ``(lo, inf)`` (``[lo, inf)`` when ``strict`` is
    0) that are also ``>= thr_min``; token ids are ``ids[j]`` when FROM_IDS else ``j``. Returns
    ``(token, its logit)``; token ``BIG`` when nothing qualifies."""
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_i = tl.full([BLOCK], BIG, dtype=tl.int32)
    best_x = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for start in tl.range(0, n, BLOCK, num_stages=STAGES):
        j = start + offs
        valid = j < n
        x = tl.load(src + j, mask=valid, other=float("-inf"))
        if FROM_IDS:
            cols = tl.load(ids + j, mask=valid, other=0)
        else:
            cols = j
        keep = valid & ((x > lo) | ((strict == 0) & (x >= lo))) & (x >= thr_min) & (x > float("-inf"))
        best, best_i, best_x = race_step(best, best_i, best_x, x, cols, keep, c, k1, k2, FAST)
    _, tok, x_tok = race_result(best, best_i, best_x, BIG)
    return tok, x_tok


@triton.jit
def round_keys(key, r):
    """Two 32-bit words of the row's key for rejection round ``r``."""
    lo32 = (key & 0xFFFFFFFF).to(tl.uint32)
    hi32 = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k1 = mix32(lo32 ^ (r.to(tl.uint32) * 0x632BE5AB))
    k2 = mix32(hi32 + (r.to(tl.uint32) * 0x9E3779B9))
    return k1, k2
