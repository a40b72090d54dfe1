"""Scheduler block: requests and their states, scheduling policies, the scheduler, a simulator.

Pure Python, no tensors. The scheduler drives a :class:`blocks.cache.manager.KVCacheManager` and
emits one :class:`SchedulerOutput` per step; :mod:`blocks.sched.simulate` runs it on synthetic traces
(``blocks simulate``). The simulator and trace modules are not imported here (they need numpy).
"""

from .config import SchedulerConfig, SchedulerStats
from .errors import QueueFullError, SchedulerError
from .output import CachedRequestData, NewRequestData, SchedulerOutput
from .policy import POLICIES, CacheAwarePolicy, FCFSPolicy, PriorityPolicy, SchedulingPolicy, make_policy
from .request import PreemptionReason, Request, RequestStatus
from .scheduler import Scheduler

__all__ = [
    "Scheduler", "SchedulerConfig", "SchedulerStats", "SchedulerOutput", "NewRequestData", "CachedRequestData",
    "Request", "RequestStatus", "PreemptionReason", "SchedulingPolicy", "FCFSPolicy", "PriorityPolicy",
    "CacheAwarePolicy", "POLICIES", "make_policy", "QueueFullError", "SchedulerError",
]
