"""The scheduler's queue of waiting and preempted requests: a heap by policy key with lazy removal.

A request leaves the count when it is admitted, aborted or finished while waiting (:meth:`WaitingQueue.remove`);
its heap entry stays and is skipped when popped (its status is no longer waiting or preempted), so removal is
O(1). ``num_waiting`` and ``num_queued_tokens`` are what admission control checks.
"""

from __future__ import annotations

import heapq

from blocks.sched.request import Request, RequestStatus

__all__ = ["WaitingQueue"]

_QUEUED = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


class WaitingQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[tuple, Request]] = []
        self.num_waiting = 0
        self.num_queued_tokens = 0

    def push(self, key: tuple, req: Request) -> None:
        """Queue ``req`` (counted) under the policy key ``key``."""
        heapq.heappush(self._heap, (key, req))
        self.num_waiting += 1
        self.num_queued_tokens += req.num_tokens

    def put_back(self, key: tuple, req: Request) -> None:
        """Return a popped, still counted request to the heap (it was not admitted)."""
        heapq.heappush(self._heap, (key, req))

    def pop(self, k: int) -> list[Request]:
        """Up to ``k`` queued requests in key order, off the heap but still counted (admit them with
        :meth:`remove`, or :meth:`put_back` the others)."""
        out = []
        heap = self._heap
        while heap and len(out) < k:
            req = heapq.heappop(heap)[1]
            if req.status in _QUEUED:
                out.append(req)
        return out

    def add_tokens(self, n: int) -> None:
        """A queued request grew by ``n`` tokens (one sampled before it was preempted)."""
        self.num_queued_tokens += n

    def remove(self, req: Request) -> None:
        """Uncount ``req`` (admitted, aborted or finished); a heap entry left behind is skipped when popped."""
        self.num_waiting -= 1
        self.num_queued_tokens -= req.num_tokens

    def in_order(self) -> list[Request]:
        """The queued requests in key order (a sorted copy)."""
        return [r for _, r in sorted(self._heap, key=lambda e: e[0]) if r.status in _QUEUED]
