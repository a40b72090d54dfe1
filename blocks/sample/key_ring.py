"""Pinned host slots the Triton sampling kernels read each step's random keys from, with no copy.

A step's keys (one int64 a row, drawn on the host) used to travel by a pinned buffer and an asynchronous
host-to-device copy. On an H100 that copy, the copy engine's hand-off to the kernel and the host calls
around it cost about 15 us a step at batch 256 (step 185 against 169 us with the keys already on the GPU).
Under unified addressing a pinned host buffer is readable by kernels directly (Triton's launcher turns its
address into the device's view of it), and each program reads its one key over PCIe at its start.

The host must not refill a slot while a launched kernel may still read it. Slots are used in rotation, in
groups of ``GROUP`` steps; after the last step of a group an event is recorded, and before a group's slots
are reused the event of the group that last used them is waited on. So the host waits only when it runs a
whole ring ahead of the GPU, and records one event every ``GROUP`` steps (an event costs 5-15 us of host
time on the device machines).
"""

from __future__ import annotations

import torch

__all__ = ["KeyRing"]

GROUP = 8


class KeyRing:
    """``groups * GROUP`` pinned int64 host buffers of ``capacity`` keys, used in rotation.

    Use: ``keys = ring.acquire(n)`` (a ``[n]`` pinned CPU view to fill), launch the kernels that read it,
    then ``ring.release()`` on the stream they ran on."""

    def __init__(self, capacity: int, *, groups: int = 4) -> None:
        if capacity < 1 or groups < 2:
            raise ValueError(f"capacity must be positive and groups at least 2, got {capacity} and {groups}.")
        self.capacity = capacity
        self._bufs = [torch.empty(capacity, dtype=torch.int64, pin_memory=True) for _ in range(groups * GROUP)]
        self._events: list[torch.cuda.Event | None] = [None] * groups
        self._step = 0  # steps released so far
        self._held = False

    def acquire(self, num_keys: int) -> torch.Tensor:
        """The next slot's first ``num_keys`` entries (at a group's start, waits until the kernels of the group
        that last used its slots are done)."""
        if num_keys > self.capacity:
            raise ValueError(f"num_keys must be <= the ring's capacity {self.capacity}, got {num_keys}.")
        if self._held:
            raise RuntimeError("acquire() twice without release().")
        slot = self._step % len(self._bufs)
        group = slot // GROUP
        if slot % GROUP == 0 and self._events[group] is not None:
            self._events[group].synchronize()
        self._held = True
        return self._bufs[slot][:num_keys]

    def release(self) -> None:
        """Mark the acquired slot as handed to the kernels enqueued so far on the current stream."""
        if not self._held:
            raise RuntimeError("release() without acquire().")
        slot = self._step % len(self._bufs)
        if slot % GROUP == GROUP - 1:
            group = slot // GROUP
            event = self._events[group] or torch.cuda.Event()
            event.record()
            self._events[group] = event
        self._step += 1
        self._held = False

    def wait_all(self) -> None:
        """Wait until no launched kernel reads any slot (before the buffers are dropped)."""
        torch.cuda.current_stream().synchronize()
