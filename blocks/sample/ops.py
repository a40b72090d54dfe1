"""Plain-torch reference ops of the sampler: penalties, the top-k / top-p / min-p threshold, and
exponential-race sampling.

The filters follow transformers' warpers (``TopKLogitsWarper``, ``TopPLogitsWarper``,
``MinPLogitsWarper``) applied in that order on temperature-scaled logits. All three keep a token
when its logit is at least some per-row value, so the whole filter is one threshold per row:

* top-k keeps ``logit >= v_k`` (the k-th largest value; ties at the boundary are kept);
* top-p (on the top-k survivors, renormalised) keeps the tokens whose strictly-higher-ranked mass is
  ``< top_p``, i.e. the shortest head whose mass reaches ``top_p``;
* min-p keeps ``prob >= min_p * max_prob``, i.e. ``logit >= max + temperature * log(min_p)``.

``filter_threshold`` returns that value on the *unscaled* logits (the k/p part is always one of the
row's own logits, so ``logits >= threshold`` reproduces the set exactly). The Triton kernel in
``triton_topk_topp.py`` computes the same thresholds without sorting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["apply_penalties", "filter_threshold", "apply_threshold", "exponential_race", "SortPlan", "NEG_INF"]

NEG_INF = float("-inf")


def apply_penalties(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    output_counts: torch.Tensor,
    *,
    repetition_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
) -> torch.Tensor:
    """Apply vLLM's penalties in place, touching only the tokens each row has seen.

    Args:
        logits: ``[num_rows, vocab]`` float32, modified in place and returned.
        token_ids: ``[num_rows, max_len]`` int64, the prompt and generated tokens of each row; padding
            must repeat a token of the same row (the update is idempotent, so repeats are harmless).
        output_counts: ``[num_rows, vocab]`` int32, how often each token was *generated* by the row.
        repetition_penalty, frequency_penalty, presence_penalty: ``[num_rows]`` float32.

    Repetition (prompt and output tokens): positive logits are divided by the penalty, negative
    ones multiplied. Then ``logit -= frequency * count + presence * (count > 0)`` (output tokens only).
    """
    seen = logits.gather(1, token_ids)
    counts = output_counts.gather(1, token_ids).to(logits.dtype)
    rep = repetition_penalty[:, None]
    seen = torch.where(seen > 0, seen / rep, seen * rep)
    seen = seen - frequency_penalty[:, None] * counts - presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits.scatter_(1, token_ids, seen)


@dataclass
class SortPlan:
    """Host knowledge that lets ``filter_threshold`` avoid full sorts.

    ``top_k_rows`` ``[m]`` int64: random rows with top-k (their top-k / top-p threshold only needs the
    ``max_top_k`` largest logits, from ``torch.topk``); ``full_sort_rows`` ``[f]`` int64: random rows
    with top-p and no top-k (full sort). Other rows need no sort. Either may be None (no such rows).
    """

    top_k_rows: torch.Tensor | None
    max_top_k: int
    full_sort_rows: torch.Tensor | None


def _top_k_top_p_threshold(
    vals: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, inv_t: torch.Tensor, row_max: torch.Tensor
) -> torch.Tensor:
    """Threshold from logits sorted descending ``vals`` ``[m, w]`` with ``1 <= k <= w`` ``[m]``."""
    thr_k = vals.gather(1, (k - 1)[:, None]).squeeze(1)
    scaled = torch.where(vals >= thr_k[:, None], (vals - row_max[:, None]) * inv_t[:, None], NEG_INF)
    probs = torch.softmax(scaled, dim=1)
    mass_above = torch.cumsum(probs, dim=1) - probs
    keep = (mass_above < top_p[:, None]) | (top_p[:, None] >= 1.0)
    num_kept = keep.sum(dim=1).clamp(min=1)
    thr_p = vals.gather(1, (num_kept - 1)[:, None]).squeeze(1)
    return torch.maximum(thr_k, thr_p)


def filter_threshold(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    *,
    rows_need_sort: bool = True,
    sort_plan: SortPlan | None = None,
) -> torch.Tensor:
    """Per-row threshold of the top-k, top-p and min-p filters (sort-based reference).

    Args:
        logits: ``[num_rows, vocab]`` float32 (unscaled: after penalties and biases).
        temperature: ``[num_rows]`` float32; rows with 0 are greedy and get ``-inf``.
        top_k: ``[num_rows]`` int32/int64, 0 = off. top_p: ``[num_rows]`` float32, 1 = off.
        min_p: ``[num_rows]`` float32, 0 = off.
        rows_need_sort: pass False when no row has top-k or top-p (host knowledge, skips the sort).
        sort_plan: which rows need ``topk`` / a full sort (host knowledge); None = sort every row.

    Returns:
        ``[num_rows]`` float32: keep token ``j`` of row ``i`` iff ``logits[i, j] >= threshold[i]``.
    """
    num_rows, vocab = logits.shape
    greedy = temperature <= 0
    inv_t = torch.where(greedy, torch.ones_like(temperature), 1.0 / temperature.clamp_min(1e-30))
    row_max = logits.max(dim=1).values
    thr = torch.full((num_rows,), NEG_INF, dtype=torch.float32, device=logits.device)
    if rows_need_sort and sort_plan is None:
        vals = logits.sort(dim=1, descending=True).values
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).long()
        thr = _top_k_top_p_threshold(vals, k, top_p, inv_t, row_max)
    elif rows_need_sort:
        plan = sort_plan
        if plan.top_k_rows is not None:
            rows = plan.top_k_rows
            width = min(plan.max_top_k, vocab)
            vals = logits[rows].topk(width, dim=1).values
            k = top_k[rows].clamp(min=1, max=width).long()
            thr[rows] = _top_k_top_p_threshold(vals, k, top_p[rows], inv_t[rows], row_max[rows])
        if plan.full_sort_rows is not None:
            rows = plan.full_sort_rows
            vals = logits[rows].sort(dim=1, descending=True).values
            k = torch.full_like(rows, vocab)
            thr[rows] = _top_k_top_p_threshold(vals, k, top_p[rows], inv_t[rows], row_max[rows])
    log_min_p = torch.where(min_p > 0, torch.log(min_p.clamp_min(1e-30)), torch.full_like(min_p, NEG_INF))
    thr_min = row_max + log_min_p * temperature
    thr = torch.maximum(thr, torch.where(min_p > 0, thr_min, torch.full_like(thr_min, NEG_INF)))
    return torch.where(greedy, torch.full_like(thr, NEG_INF), thr)


def apply_threshold(logits: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[num_rows, vocab]`` with entries below ``threshold[:, None]`` set to ``-inf`` (new tensor)."""
    return logits.masked_fill(logits < threshold[:, None], NEG_INF)


def exponential_race(scaled_logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample by the exponential race: ``argmax(probs / noise)`` with ``noise ~ Exp(1)``.

    ``scaled_logits`` ``[num_rows, vocab]`` float32 (filtered entries ``-inf``, already divided by
    the temperature); ``noise`` same shape, positive. Computed as ``argmax(logit - log(noise))``,
    which needs no softmax. Returns ``[num_rows]`` int64.
    """
    return (scaled_logits - noise.log()).argmax(dim=1)


def log_of(x: float) -> float:
    """``math.log`` that maps 0 to ``-inf`` (helper for host-side thresholds)."""
    return math.log(x) if x > 0 else NEG_INF
