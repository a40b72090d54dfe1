"""Scheduling policies: which waiting request is admitted next, which running one is preempted.

A policy is a small object the :class:`~blocks.sched.scheduler.Scheduler` consults:

* ``key(request)`` orders the waiting queue (smallest first). The scheduler admits in this order
  and stops at the first request that does not fit (head-of-line), so no later key overtakes an
  earlier one unless the policy re-ranks a window (below).
* ``select_victim(running)`` picks the request to preempt when blocks run out (the largest key:
  the latest arrival for FCFS, the lowest priority for priority scheduling).
* ``window`` and ``rank(candidates, cached_tokens)``: the scheduler pops the ``window`` smallest keys
  and admits them in the order ``rank`` returns; ``on_admitted`` lets the policy count bypasses.

Policies: :class:`FCFSPolicy`, :class:`PriorityPolicy` (lower ``priority`` first, FCFS within a
priority) and :class:`CacheAwarePolicy` (longest cached prefix first among the oldest ``window``
requests, as SGLang's LPM; a request bypassed ``max_skips`` times goes first, so none starves).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from blocks.sched.request import Request

__all__ = ["SchedulingPolicy", "FCFSPolicy", "PriorityPolicy", "CacheAwarePolicy", "make_policy", "POLICIES"]


class SchedulingPolicy:
    """Base policy: FCFS order, preempt the largest key. Subclasses override ``key`` or ``rank``."""

    name = "base"
    #: how many waiting requests the scheduler pops and hands to ``rank`` at once.
    window = 1

    def key(self, request: Request) -> tuple:
        """Waiting-queue sort key (smallest first); must be unique, so it ends with ``request.seq``."""
        return (request.arrival_time, request.seq)

    def select_victim(self, running: Sequence[Request]) -> Request:
        """The running request to preempt (the one this policy values least)."""
        return max(running, key=self.key)

    def rank(self, candidates: list[Request], cached_tokens: Callable[[Request], int]) -> list[Request]:
        """Order ``candidates`` (already sorted by ``key``) for admission; default: unchanged."""
        return candidates

    def on_admitted(self, request: Request, pending: Sequence[Request]) -> None:
        """Called after ``request`` is admitted while ``pending`` candidates still wait."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: by ``arrival_time``, then by submission order."""

    name = "fcfs"


class PriorityPolicy(SchedulingPolicy):
    """Lower ``priority`` value first, FCFS within a priority; preempts the lowest-priority, latest request."""

    name = "priority"

    def key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time, request.seq)


class CacheAwarePolicy(SchedulingPolicy):
    """Prefer waiting requests with the longest cached prefix, without starving the others.

    Among the ``window`` oldest waiting requests, admit those with the most prefix-cache hit tokens
    first (ties by arrival), so requests of one shared-prefix group run while their prefix is still
    cached. Every time a request is admitted ahead of an older candidate, that candidate's
    ``skips`` grows; once it reaches ``max_skips`` it is ranked first. Since the oldest request is
    always in the window, every request is admitted after at most ``max_skips`` bypasses (given
    memory for it). With prefix caching off every hit is 0 and this is FCFS.

    Args:
        window: waiting requests considered per admission round (``>= 1``).
        max_skips: bypasses a request tolerates before it goes first (``>= 0``).
    """

    name = "cache_aware"

    def __init__(self, *, window: int = 32, max_skips: int = 8):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {max_skips}")
        self.window = window
        self.max_skips = max_skips

    def rank(self, candidates: list[Request], cached_tokens: Callable[[Request], int]) -> list[Request]:
        limit = self.max_skips
        starved = [r for r in candidates if r.skips >= limit]
        rest = [r for r in candidates if r.skips < limit]
        rest.sort(key=lambda r: (-cached_tokens(r), r.arrival_time, r.seq))
        return starved + rest

    def on_admitted(self, request: Request, pending: Sequence[Request]) -> None:
        key = self.key(request)
        for other in pending:
            if self.key(other) < key:
                other.skips += 1

    def __repr__(self) -> str:
        return f"CacheAwarePolicy(window={self.window}, max_skips={self.max_skips})"


POLICIES: dict[str, type[SchedulingPolicy]] = {
    "fcfs": FCFSPolicy,
    "priority": PriorityPolicy,
    "cache_aware": CacheAwarePolicy,
}


def make_policy(policy: str | SchedulingPolicy) -> SchedulingPolicy:
    """A policy object from a name in :data:`POLICIES` (or the object itself)."""
    if isinstance(policy, SchedulingPolicy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    return POLICIES[policy]()
