"""Triton building blocks shared by the threshold and sampling kernels: each row's parameters, exact
top-k / top-p threshold searches in logit space over a row (or a compacted candidate list) without
sorting, and the host side both kernels share (input checks, program count, a reused scratch workspace).

:func:`threshold_search` keeps an interval ``[lo, hi)`` of logit values and narrows it by counting, in one
pass over the ``n`` values, how many are ``>=`` each of ``NUM_PIVOTS`` pivots spread over the interval (and
their probability mass ``exp((x - m) / T)``):

* top-k (``USE_MASS=False``, ``need = k``): invariant ``count(x >= lo) >= k > count(x >= hi)``; it stops
  when exactly ``k`` are ``>= lo``, when the interval holds at most one value, or when it cannot be split
  any more (ties at the threshold are all kept, as transformers keeps them);
* top-p (``USE_MASS=True``, ``need = target``): the same on the mass, ``mass(x >= lo) >= target > mass(x >= hi)``.

After ``max_passes`` passes ``lo`` is a lower bound (a superset is kept). :func:`lane_bound` gives a
starting ``lo`` from per-lane maxima alone (a subset of the row, so any count or mass reached by them is
reached by the row), without a memory pass.
"""

from __future__ import annotations

import functools

import torch
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
def threshold_search(src, n, m, inv_t, lo, hi, need, max_passes, piv_idx, offs, BLOCK: tl.constexpr,
                     NUM_PIVOTS: tl.constexpr, USE_MASS: tl.constexpr):
    """The top-k (count) or top-p (mass) threshold: ``(lo, mass of x >= lo)``. ``lo`` must satisfy the
    invariant on entry (its count or mass reaches ``need``)."""
    cnt_lo = tl.full([], 2147483647, dtype=tl.int32)
    cnt_hi = tl.zeros([], dtype=tl.int32)
    mass_lo = tl.full([], float("inf"), dtype=tl.float32)
    done = tl.zeros([], dtype=tl.int32)
    passes = 0
    while (done == 0) & (passes < max_passes):
        pivots, cnt, mass = search_pass(src, n, m, inv_t, lo, hi, piv_idx, offs, BLOCK, NUM_PIVOTS)
        if USE_MASS:
            ok = mass >= need
        else:
            ok = cnt >= need
        lo = tl.max(tl.where(ok, pivots, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, pivots), axis=0)
        cnt_lo = tl.min(tl.where(ok, cnt, cnt_lo), axis=0)
        mass_lo = tl.min(tl.where(ok, mass, mass_lo), axis=0)  # masses fall as pivots rise: the one at lo
        cnt_hi = tl.max(tl.where(ok, cnt_hi, cnt), axis=0)
        splittable = lo + (hi - lo) * (1.0 / NUM_PIVOTS) > lo
        stop = (cnt_lo - cnt_hi <= 1) | (splittable == 0)
        if not USE_MASS:
            stop = stop | (cnt_lo == need)
        done = stop.to(tl.int32)
        passes += 1
    return lo, mass_lo


@triton.jit
def row_params(row, temp_ptr, topk_ptr, topp_ptr, minp_ptr):
    """One row's ``(temperature, greedy, 1 / T (1 when greedy), top_k int32, top_p, min_p)``."""
    temp = tl.load(temp_ptr + row)
    greedy = temp <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.maximum(temp, 1e-30))
    return temp, greedy, inv_t, tl.load(topk_ptr + row).to(tl.int32), tl.load(topp_ptr + row), tl.load(minp_ptr + row)


def check_rows(logits: torch.Tensor) -> None:
    """The logits contract of both Triton sampler kernels: ``[num_rows, vocab]`` float32, unit stride."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a 2-D float32 tensor, got {tuple(logits.shape)} {logits.dtype}.")
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary dimension.")


def stream_key(device: torch.device) -> int:
    """The current CUDA stream's handle on ``device`` (0 off CUDA): keys the reused workspaces. The raw
    lookup costs about 1 us of host time where ``torch.cuda.current_stream()`` costs 5-13 us."""
    if device.type != "cuda":
        return 0
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return raw(index) if raw is not None else torch.cuda.current_stream(device).cuda_stream


@functools.cache
def max_programs(device: torch.device, per_sm: int) -> int:
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def default_programs(logits: torch.Tensor, per_sm: int = 4) -> int:
    """Persistent programs: one per row, at most ``per_sm`` per SM on CUDA."""
    num_rows = logits.shape[0]
    return min(num_rows, max_programs(logits.device, per_sm)) if logits.is_cuda else num_rows


def launch_layout(logits: torch.Tensor, block: int, num_programs: int | None, candidates: int):
    """What both row kernels launch with: ``(block, num_programs, CAP, values, token ids, counters)``, the
    tile capped at the vocabulary's next power of two (at least 16), the default program count and the
    :func:`workspace` for ``candidates`` slots a program."""
    block = max(16, min(block, triton.next_power_of_2(logits.shape[1])))
    num_programs = num_programs or default_programs(logits)
    return (block, num_programs, *workspace(num_programs, candidates, logits.device))


_PER_STREAM: dict[tuple, tuple[tuple[int, ...], object]] = {}


def per_stream(tag: str, device: torch.device, sizes: tuple[int, ...], make):
    """Scratch kept per (``tag``, device, current stream) and rebuilt, never shrunk, when a call needs more:
    ``make(*sizes)`` builds it for the element-wise largest ``sizes`` asked so far. Calls on one stream run in
    order, so they may share it, and a sampling step allocates nothing; one dictionary lookup a call (the
    sampler's host time is its step's other cost)."""
    key = (tag, device, stream_key(device))
    hit = _PER_STREAM.get(key)
    if hit is None or any(n > have for n, have in zip(sizes, hit[0])):
        sizes = sizes if hit is None else tuple(max(n, have) for n, have in zip(sizes, hit[0]))
        hit = (sizes, make(*sizes))
        _PER_STREAM[key] = hit
    return hit[1]


def workspace(num_programs: int, candidates: int, device: torch.device
              ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(CAP, values, token ids, counters)``: ``candidates`` scratch slots (rounded up to a power of two) per
    program and one int32 counter per program, from :func:`per_stream` (tag ``"candidates"``)."""
    if candidates < 0:
        raise ValueError(f"candidates must be non-negative, got {candidates}.")
    cap = triton.next_power_of_2(candidates) if candidates else 0

    def make(n: int, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.empty(n * max(slots, 1), dtype=torch.float32, device=device),
                torch.empty(n * max(slots, 1), dtype=torch.int32, device=device),
                torch.empty(n, dtype=torch.int32, device=device))

    return cap, *per_stream("candidates", device, (num_programs, cap), make)
