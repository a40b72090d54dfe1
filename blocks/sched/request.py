"""Requests as the scheduler sees them: states and token accounting, no tensors.

A request's tokens are ``all_token_ids = prompt_token_ids + output_token_ids``. The first
``num_computed_tokens`` of them have their KV in the cache (computed by the model or found in the
prefix cache). Each step the scheduler picks ``n <= num_tokens - num_computed_tokens`` tokens to
compute; when a step brings ``num_computed_tokens`` up to ``num_tokens`` the model's sampled token
is appended to ``output_token_ids`` (a partial prefill chunk samples nothing).

States (:class:`RequestStatus`): ``WAITING`` (never ran) and ``PREEMPTED`` (ran, lost its blocks,
queued again to recompute) live in the waiting queue; ``RUNNING`` requests hold blocks; the three
finished states are ``FINISHED_STOPPED`` (EOS or stop token), ``FINISHED_LENGTH`` (``max_tokens``
or ``max_model_len``) and ``FINISHED_ABORTED``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

__all__ = ["Request", "RequestStatus", "PreemptionReason"]


class RequestStatus(enum.IntEnum):
    """Life cycle of a request; everything ``>= FINISHED_STOPPED`` is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """vLLM's ``finish_reason`` string: ``"stop"``, ``"length"``, ``"abort"`` or None if unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class PreemptionReason(enum.StrEnum):
    """Why a running request lost its blocks."""

    #: a running request (this one or one ahead of it) needed a new block and none was free.
    OUT_OF_BLOCKS = "out_of_blocks"


class Request:
    """One generation request (host-side state only).

    Args:
        request_id: unique id.
        prompt_token_ids: the prompt, ``>= 1`` token ids (ints).
        max_tokens: output tokens to generate at most (``>= 1``).
        arrival_time: seconds (any clock); FCFS orders by it.
        priority: lower value is served first by the priority policy.
        eos_token_id: stops the request when sampled (unless ``ignore_eos``), after ``min_tokens``.
        stop_token_ids: further token ids that stop the request (after ``min_tokens``).
        min_tokens: EOS and stop tokens are ignored before this many output tokens.
        ignore_eos: never stop on EOS.
        cache_salt: isolates the prefix cache (only requests with the same salt share blocks).
        lora_id: adapter id; also part of the prefix-cache key.
        check_stop: call the scheduler's ``stop_checker`` after each token of this request (the engine
            turns it off for requests without stop strings, which keeps them on the fast path).

    Attributes:
        output_token_ids: sampled tokens so far.
        all_token_ids: prompt + output, kept as one list (the prefix cache hashes it).
        num_computed_tokens: tokens whose KV is in the cache.
        num_blocks: KV blocks the request holds (scheduler bookkeeping).
        num_preemptions: how often it was preempted; ``preemptions`` lists ``(step, reason)``.
        first_scheduled_step / first_token_time / finish_time: timing hooks filled by the caller.
        num_cached_tokens: prompt tokens found in the prefix cache at first admission (-1 until then).
    """

    __slots__ = (
        "request_id", "prompt_token_ids", "max_tokens", "arrival_time", "priority", "eos_token_id",
        "stop_token_ids", "min_tokens", "ignore_eos", "cache_salt", "lora_id", "extra_keys",
        "output_token_ids", "all_token_ids", "num_prompt_tokens", "num_computed_tokens", "num_blocks",
        "num_slot_tokens",
        "status", "num_preemptions", "preemptions", "num_cached_tokens", "first_scheduled_step",
        "first_token_time", "finish_time", "seq", "skips", "stop_ids", "prefix_hint", "needs_cow_check",
        "check_stop", "num_in_flight", "in_flight_step", "__weakref__",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        *,
        max_tokens: int = 16,
        arrival_time: float = 0.0,
        priority: int = 0,
        eos_token_id: int | None = None,
        stop_token_ids: Sequence[int] = (),
        min_tokens: int = 0,
        ignore_eos: bool = False,
        cache_salt: str | None = None,
        lora_id: int | None = None,
        check_stop: bool = True,
    ):
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must hold at least 1 token, got 0")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if min_tokens < 0 or min_tokens > max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={max_tokens}], got {min_tokens}")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.max_tokens = max_tokens
        self.arrival_time = arrival_time
        self.priority = priority
        self.eos_token_id = eos_token_id
        self.stop_token_ids = frozenset(stop_token_ids)
        # every token that may stop the request (a superset check; min_tokens is applied in append_token)
        self.stop_ids = self.stop_token_ids | (
            {eos_token_id} if eos_token_id is not None and not ignore_eos else frozenset()
        )
        self.min_tokens = min_tokens
        self.ignore_eos = ignore_eos
        self.cache_salt = cache_salt
        self.lora_id = lora_id
        self.check_stop = check_stop
        keys = []
        if cache_salt is not None:
            keys.append(("salt", cache_salt))
        if lora_id is not None:
            keys.append(("lora", lora_id))
        self.extra_keys = tuple(keys)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_blocks = 0
        self.num_slot_tokens = 0  # tokens the KV cache manager was last told about (scheduler bookkeeping)
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.preemptions: list[tuple[int, str]] = []
        self.num_cached_tokens = -1
        self.first_scheduled_step = -1
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.seq = 0  # admission order, set by the scheduler (FCFS tie-break)
        self.skips = 0  # times a later request was admitted ahead of it (cache-aware policy)
        self.needs_cow_check = False  # shares a partly filled block after a fork: ask the KV manager next step
        self.prefix_hint = (-(1 << 62), 0)  # (step, cached tokens) of the last lookup (cache-aware policy)
        # tokens that scheduled steps will sample but update_from_output has not reported yet (0, or 1 while
        # an asynchronous engine runs the next step before reading this one's token), and the step that
        # last added one
        self.num_in_flight = 0
        self.in_flight_step = -1

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_token(self, token_id: int) -> RequestStatus | None:
        """Append one sampled token; return the finished status it causes, or None to go on.

        Checks, in order: ``max_tokens`` (length), then EOS and stop tokens (stop, only once
        ``min_tokens`` outputs exist). The caller applies the status and frees the blocks.
        """
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        n = len(self.output_token_ids)
        if n >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if n >= self.min_tokens and (
            (token_id == self.eos_token_id and not self.ignore_eos) or token_id in self.stop_token_ids
        ):
            return RequestStatus.FINISHED_STOPPED
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"output={len(self.output_token_ids)}, computed={self.num_computed_tokens}, "
            f"preemptions={self.num_preemptions})"
        )
