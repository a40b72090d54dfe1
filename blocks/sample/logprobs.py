"""Logprobs of sampled tokens (value, rank, top-n) and prompt logprobs.

``LogprobsTensors`` is what the sampler returns per step and what ``compute_prompt_logprobs``
returns for a prompt: the chosen token's logprob and rank (1 = most likely; vLLM's definition:
one plus the number of tokens with a strictly higher logprob) and the top-n ids and logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LogprobsTensors", "compute_logprobs", "compute_prompt_logprobs"]


@dataclass
class LogprobsTensors:
    """Logprobs of ``num_rows`` positions (all on the logits' device).

    ``token_logprobs`` ``[num_rows]`` float32 and ``token_ranks`` ``[num_rows]`` int64 of the chosen token;
    ``topk_ids`` ``[num_rows, num_top]`` int64 and ``topk_logprobs`` ``[num_rows, num_top]`` float32,
    sorted by decreasing logprob (``num_top`` may be 0).
    """

    token_logprobs: torch.Tensor
    token_ranks: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor

    def row(self, i: int, *, num_top: int | None = None) -> dict[int, tuple[float, int]]:
        """Host dict ``token id -> (logprob, rank)`` for row ``i``: top ``num_top`` entries (host sync)."""
        n = self.topk_ids.shape[1] if num_top is None else num_top
        return self.to_host([i], [n])[0][2]

    def to_host(self, rows: list[int], num_tops: list[int]) -> list[tuple[float, int, dict[int, tuple[float, int]]]]:
        """``(chosen logprob, chosen rank, {token id: (logprob, rank)} of the top num_tops[k])`` for each of
        ``rows``, with one host read per tensor (not one per row)."""
        values, ranks = self.token_logprobs.tolist(), self.token_ranks.tolist()
        top_ids, top_vals = self.topk_ids.tolist(), self.topk_logprobs.tolist()
        return [
            (values[i], ranks[i], {t: (v, r + 1) for r, (t, v) in enumerate(zip(top_ids[i][:n], top_vals[i][:n]))})
            for i, n in zip(rows, num_tops)
        ]


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Logprobs of ``token_ids`` under ``logits`` and the top-``num_top`` alternatives.

    Args:
        logits: ``[num_rows, vocab]`` float32 (raw or processed; ``-inf`` entries allowed).
        token_ids: ``[num_rows]`` int64, the chosen token of each row.
        num_top: number of alternatives (0 allowed, at most ``vocab``).
    """
    if num_top < 0 or num_top > logits.shape[1]:
        raise ValueError(f"num_top must be in [0, {logits.shape[1]}], got {num_top}.")
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    chosen = logits.gather(1, token_ids[:, None])
    ranks = (logits > chosen).sum(dim=1) + 1
    if num_top > 0:
        top_vals, top_ids = logits.topk(num_top, dim=1)
    else:
        top_vals = logits.new_empty(logits.shape[0], 0)
        top_ids = token_ids.new_empty(logits.shape[0], 0)
    return LogprobsTensors(
        token_logprobs=(chosen - lse).squeeze(1),
        token_ranks=ranks.to(torch.int64),
        topk_ids=top_ids,
        topk_logprobs=top_vals - lse,
    )


def compute_prompt_logprobs(
    logits: torch.Tensor, prompt_token_ids: torch.Tensor, *, num_logprobs: int, chunk_size: int = 1024
) -> LogprobsTensors:
    """Prompt logprobs: how likely each prompt token was given the tokens before it.

    Args:
        logits: ``[num_prompt_tokens, vocab]`` float32; row ``j`` is the model's prediction after
            prompt token ``j`` (the prefill output at every position).
        prompt_token_ids: ``[num_prompt_tokens]`` int64, the whole prompt.
        num_logprobs: top-n alternatives per position.
        chunk_size: rows processed at once (bounds the temporary memory).

    Returns:
        ``LogprobsTensors`` of ``num_prompt_tokens - 1`` rows: row ``j`` scores prompt token ``j + 1``
        (the first prompt token has no context; vLLM reports ``None`` for it).
    """
    if logits.dim() != 2 or prompt_token_ids.shape != (logits.shape[0],):
        raise ValueError(
            f"logits [num_prompt_tokens, vocab] and prompt_token_ids [num_prompt_tokens] must agree, got "
            f"{tuple(logits.shape)} and {tuple(prompt_token_ids.shape)}."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    targets = prompt_token_ids[1:].to(torch.int64)
    preds = logits[:-1]
    parts = [
        compute_logprobs(preds[s : s + chunk_size].float(), targets[s : s + chunk_size], num_logprobs)
        for s in range(0, preds.shape[0], chunk_size)
    ]
    if not parts:
        return compute_logprobs(preds.float(), targets, num_logprobs)
    return LogprobsTensors(*(torch.cat([getattr(p, f) for p in parts]) for f in LogprobsTensors.__dataclass_fields__))
