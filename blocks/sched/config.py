"""Scheduler limits (:class:`SchedulerConfig`) and counters (:class:`SchedulerStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SchedulerConfig", "SchedulerStats"]


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of one scheduler (vLLM's names and meanings).

    Attributes:
        max_num_seqs: requests running at once.
        max_num_batched_tokens: token budget of one step (decode tokens + prefill chunks).
        max_model_len: longest sequence (prompt + output); a request stops with ``"length"`` there.
        long_prefill_token_threshold: a prefill computes at most this many tokens per step, so one
            long prompt cannot hold the whole budget and starve short ones (0 = no cap).
        enable_chunked_prefill: split prompts longer than the remaining budget over several steps;
            when False a prompt is admitted only if it fits whole in the step's budget.
        max_num_queued_requests: admission control: waiting requests at most (None = no cap).
        max_num_queued_tokens: admission control: prompt tokens of waiting requests at most.
        watermark: fraction of KV blocks that must stay free after admitting a request while others
            run (headroom for their decode, part of the anti-thrashing guard).
        thrash_guard: admit a waiting or preempted request only when free blocks cover its whole
            remaining prefill plus the watermark (not just this step's chunk; vLLM issue 25538).
            False admits whenever this step's chunk fits (for comparison).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    long_prefill_token_threshold: int = 0
    enable_chunked_prefill: bool = True
    max_num_queued_requests: int | None = None
    max_num_queued_tokens: int | None = None
    watermark: float = 0.01
    thrash_guard: bool = True

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if not self.enable_chunked_prefill and self.long_prefill_token_threshold:
            raise ValueError("long_prefill_token_threshold must be 0 when enable_chunked_prefill is False, "
                             f"got {self.long_prefill_token_threshold}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_model_len={self.max_model_len} without chunked prefill, "
                f"got {self.max_num_batched_tokens}"
            )
        for name in ("max_num_queued_requests", "max_num_queued_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")


@dataclass(kw_only=True)
class SchedulerStats:
    """Counters since the scheduler was built (read them for metrics; the scheduler only adds).

    Attributes:
        num_steps: ``schedule()`` calls.
        num_preemptions: preemptions in total; ``preemptions_by_reason`` splits them.
        num_thrash_guard_deferrals: admissions postponed because the request's whole remaining
            prefill (plus the watermark) did not fit in free blocks.
        prefix_query_tokens: tokens looked up in the prefix cache at admission.
        prefix_hit_tokens: of those, tokens found cached (counted as computed).
        num_finished: finished requests by reason (``"stop"``, ``"length"``, ``"abort"``).
        num_rejected: requests refused by admission control.
    """

    num_steps: int = 0
    num_preemptions: int = 0
    preemptions_by_reason: dict[str, int] = field(default_factory=dict)
    num_thrash_guard_deferrals: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_finished: dict[str, int] = field(default_factory=dict)
    num_rejected: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0
