"""``SchedulerOutput``: what one scheduler step tells the model runner (DESIGN.md section 3).

No tensors: plain ints and lists. The runner keeps a persistent per-request state (token ids and
block table) and updates it from this object:

* ``scheduled_new_reqs``: requests that start (or restart after preemption) this step. They carry
  all their token ids and their full block table; the runner (re)creates its state from them.
* ``scheduled_cached_reqs``: requests already known to the runner, stored column-wise (one list per
  field, same order) so a 1024-request decode step does not build 1024 objects. ``new_block_ids[i]``
  are appended to request ``i``'s block table (usually empty).
* ``num_scheduled_tokens[request_id]``: tokens to compute this step, starting at that request's
  ``num_computed_tokens`` (positions ``num_computed_tokens .. num_computed_tokens + n - 1``).
* ``blocks_to_copy``: copy-on-write ``(src_block, dst_block)`` pairs to apply before the forward.
* ``preempted_req_ids``: dropped this step; the runner forgets them (they come back as new).
* ``finished_req_ids``: finished or aborted since the previous step; the runner forgets them.
* ``block_replacements``: copy-on-write table edits, ``{request_id: [(table_index, new_block_id)]}``;
  the runner overwrites those entries of its tables (the data is copied by ``blocks_to_copy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["NewRequestData", "CachedRequestData", "SchedulerOutput"]


@dataclass(slots=True)
class NewRequestData:
    """A request scheduled for the first time, or resumed after preemption.

    Attributes:
        request_id: the id.
        token_ids: prompt + output tokens so far (a resumed request recomputes its outputs too).
        num_prompt_tokens: how many of ``token_ids`` are prompt.
        block_ids: the full block table (prefix-cache hits first), ``ceil(tokens / block_size)`` ids.
        num_computed_tokens: tokens already in the KV cache before this step (prefix-cache hits).
        resumed: True when the request was preempted before.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    resumed: bool = False


@dataclass(slots=True)
class CachedRequestData:
    """Requests the runner already holds, column-wise (``len`` of every list is the same).

    Attributes:
        req_ids: request ids.
        new_block_ids: per request, block ids to append to its table (shared empty tuple if none).
        num_computed_tokens: per request, tokens already in the KV cache before this step.
    """

    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int] | tuple[()]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.req_ids)


@dataclass(slots=True)
class SchedulerOutput:
    """One step's schedule.

    Attributes:
        step: step counter (0-based).
        scheduled_new_reqs: see :class:`NewRequestData`.
        scheduled_cached_reqs: see :class:`CachedRequestData`.
        num_scheduled_tokens: request id -> tokens to compute this step (every scheduled request).
        total_num_scheduled_tokens: sum of ``num_scheduled_tokens`` (<= ``max_num_batched_tokens``).
        blocks_to_copy: copy-on-write ``(src, dst)`` block pairs.
        preempted_req_ids: requests preempted during this step.
        finished_req_ids: requests finished or aborted since the previous step.
        block_replacements: copy-on-write edits of existing tables (see the module docstring).
    """

    step: int
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    blocks_to_copy: list[tuple[int, int]]
    preempted_req_ids: list[str]
    finished_req_ids: list[str]
    block_replacements: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def num_scheduled_reqs(self) -> int:
        return len(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0
