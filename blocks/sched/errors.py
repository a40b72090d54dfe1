"""Scheduler errors.

:class:`QueueFullError` is the admission-control rejection: the waiting queue already holds
``max_num_queued_requests`` requests or ``max_num_queued_tokens`` prompt tokens. It carries
``http_status = 503`` so the server can answer "Service Unavailable" without knowing the
scheduler's internals (the server may import this module: see ``tests/test_import_graph.py``).
Invalid requests (too long, bad ``max_tokens``) raise :class:`ValueError` naming the field and the
limit instead, which the server maps to HTTP 400.
"""

from __future__ import annotations

__all__ = ["SchedulerError", "QueueFullError"]


class SchedulerError(Exception):
    """Base class of the scheduler's own errors (not raised for invalid arguments: those are ValueError)."""


class QueueFullError(SchedulerError):
    """A request was rejected by admission control; retry later (HTTP 503).

    Attributes:
        field: the limit that was hit, ``"max_num_queued_requests"`` or ``"max_num_queued_tokens"``.
        limit: the configured value of that limit.
        value: what the queue would have held with this request admitted.
        http_status: always 503.
    """

    http_status = 503

    def __init__(self, field: str, limit: int, value: int):
        self.field = field
        self.limit = limit
        self.value = value
        super().__init__(f"scheduler queue is full: {field}={limit} would be exceeded ({value}); retry later")
