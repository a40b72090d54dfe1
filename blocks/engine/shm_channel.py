"""A single-writer, multi-reader ring of fixed-size int64 message slots in POSIX shared memory.

Rank 0 of a tensor-parallel engine sends each step's inputs to its workers through it (see
:mod:`blocks.engine.tp_workers`): the workers are local child processes, so shared memory replaces a
collective broadcast (no device sync on the workers, and they see a step as soon as rank 0 publishes it).

Usable alone: ``w = ShmWriter(num_readers=1, message_bytes=1 << 20)`` creates the block; a reader process
attaches with ``r = ShmReader(w.name, 0)``; ``w.send(header, payload)`` then ``r.recv()`` gives a copy of the
words back to back; ``r.close()`` unmaps, ``w.close()`` also unlinks the block.

Layout (int64 words; the sequence counters sit on their own 64-byte lines)::

    [0:8]        MAGIC, num_slots, slot_words, num_readers
    [8]          write_seq: messages published so far
    [16 + 8 r]   read_seq of reader r: messages reader r has consumed
    then num_slots slots of slot_words words: [n, word 0, ..., word n-1]

Message ``k`` goes to slot ``k % num_slots``. The writer waits until every reader has consumed message
``k - num_slots`` (the slot's previous message), writes the words and the length, then publishes with
``write_seq = k + 1``. A reader waits for ``write_seq > k``, copies the message out, then sets its
``read_seq = k + 1``. Data is stored before the sequence that publishes it and read after the one that
announces it: x86 (TSO) keeps stores in order and loads in order, and each counter store is one aligned
8-byte numpy store; a weaker memory model (ARM) would need fences around the counters.

Waiting polls (with ``os.sched_yield``) for ``SPIN_S`` after the last message, then sleeps with backoff
up to ``MAX_SLEEP_S``: a decode loop sees messages within microseconds, an idle engine burns no core.
``alive`` callables (checked about every millisecond while waiting) turn a dead peer into an error.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

__all__ = ["ShmReader", "ShmWriter", "SPIN_S", "MAX_SLEEP_S"]

MAGIC = 0x626C6F636B73524E  # "blocksRN"
SPIN_S, MIN_SLEEP_S, MAX_SLEEP_S, CHECK_S = 0.05, 5e-5, 2e-3, 1e-3
_LINE = 8  # int64 words per 64-byte cache line
_WSEQ, _RSEQ0 = 8, 16
_ATTACH_LOCK = threading.Lock()


def _wait(ready: Callable[[], bool], last: float, alive: Callable[[], object] | None, timeout: float | None,
          what: str) -> None:
    """Return once ``ready()``; poll until ``SPIN_S`` after ``last`` (a ``time.monotonic``), then sleep.

    Raises RuntimeError when ``alive()`` returns False (it may raise its own error), TimeoutError after
    ``timeout`` seconds."""
    start = check_at = time.monotonic()
    sleep = MIN_SLEEP_S
    while not ready():
        now = time.monotonic()
        if now >= check_at:
            if alive is not None and alive() is False:
                raise RuntimeError(f"shared-memory channel: the other side died while waiting for {what}")
            if timeout is not None and now - start > timeout:
                raise TimeoutError(f"shared-memory channel: no {what} after {timeout:.3g} s")
            check_at = now + CHECK_S
        if now - last < SPIN_S:
            os.sched_yield()
        else:
            time.sleep(sleep)
            sleep = min(2 * sleep, MAX_SLEEP_S)


class _Ring:
    """The mapping and its numpy views, shared by writer and reader."""

    def _map(self, shm: SharedMemory) -> None:
        self._shm = shm
        self.name = shm.name
        words = np.ndarray((shm.size // 8,), dtype=np.int64, buffer=shm.buf)
        if int(words[0]) != MAGIC:
            del words
            shm.close()
            raise ValueError(f"shared memory {shm.name!r} is not a blocks message ring")
        self.num_slots, self.slot_words, self.num_readers = (int(x) for x in words[1:4])
        base = _RSEQ0 + _LINE * self.num_readers
        self._ctrl = words[:base]
        self._reads = words[_RSEQ0:base:_LINE]
        self._slots = words[base : base + self.num_slots * self.slot_words].reshape(self.num_slots, -1)
        self._seq = 0
        self._last = time.monotonic()

    @property
    def max_message_bytes(self) -> int:
        return 8 * (self.slot_words - 1)

    def close(self) -> None:
        """Unmap the block (idempotent). The numpy views go first: a live view keeps the mapping busy."""
        if getattr(self, "_shm", None) is not None:
            self._ctrl = self._reads = self._slots = None
            self._shm.close()
            self._shm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShmWriter(_Ring):
    """Creates the ring and sends messages (one writer; see the module docstring).

    Args:
        num_readers: readers that must consume every message before its slot is reused.
        message_bytes: the largest message (int64 words times 8); a larger one raises ValueError.
        num_slots: ring depth (messages the writer may run ahead of the slowest reader).
        name: the block's name (default: ``blocks_ring_<pid>_<random>``).
    """

    def __init__(self, *, num_readers: int, message_bytes: int, num_slots: int = 4, name: str | None = None) -> None:
        if num_readers < 1 or num_slots < 1 or message_bytes < 0:
            raise ValueError(f"bad ring shape: num_readers={num_readers}, num_slots={num_slots}, "
                             f"message_bytes={message_bytes}")
        slot_words = -(-(1 + -(-message_bytes // 8)) // _LINE) * _LINE  # length word + data, whole lines
        size = 8 * (_RSEQ0 + _LINE * num_readers + num_slots * slot_words)
        shm = SharedMemory(name=name or f"blocks_ring_{os.getpid()}_{secrets.token_hex(6)}", create=True, size=size)
        words = np.ndarray((4,), dtype=np.int64, buffer=shm.buf)
        words[:] = (MAGIC, num_slots, slot_words, num_readers)
        del words
        self._map(shm)
        self._min_read = 0  # a lower bound of every reader's read_seq

    def send(self, *parts, alive: Callable[[], object] | None = None, timeout: float | None = None) -> None:
        """Publish the int64 words of ``parts`` (array-likes, back to back) as the next message.

        Waits for the slowest reader to free the slot; ``alive`` and ``timeout`` as in the module docstring.
        Raises ValueError, writing nothing, when the message is larger than a slot."""
        arrays = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
        n = sum(a.size for a in arrays)
        if n > self.slot_words - 1:
            raise ValueError(f"shared-memory channel: a message of {8 * n} bytes does not fit a slot of "
                             f"{self.max_message_bytes} bytes")
        k = self._seq
        oldest = k - self.num_slots + 1  # every reader must have consumed message k - num_slots
        if self._min_read < oldest:
            reads = self._reads
            _wait(lambda: int(reads.min()) >= oldest, self._last, alive, timeout, "readers to free a slot")
            self._min_read = int(reads.min())
        slot = self._slots[k % self.num_slots]
        pos = 1
        for a in arrays:
            slot[pos : pos + a.size] = a
            pos += a.size
        slot[0] = n
        self._ctrl[_WSEQ] = k + 1  # publish after the data (x86 keeps stores in order)
        self._seq = k + 1
        self._last = time.monotonic()

    def close(self) -> None:
        """Unmap and unlink the block (idempotent; readers that still map it keep their mapping)."""
        shm = getattr(self, "_shm", None)
        super().close()
        if shm is not None:
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()


def _attach(name: str) -> SharedMemory:
    """Map an existing block without registering it with this process's resource tracker.

    Python < 3.13 registers every attach, so the tracker unlinks the block (and warns of a leak) when a
    reader exits; unregistering afterwards is no cure when the reader shares its creator's tracker (a
    multiprocessing child): it would drop the creator's registration too."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name, track=False)
    with _ATTACH_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda *args: None
        try:
            return SharedMemory(name)
        finally:
            resource_tracker.register = register


class ShmReader(_Ring):
    """Reader ``index`` (``0 <= index < num_readers``) of the ring named ``name``; never unlinks it."""

    def __init__(self, name: str, index: int) -> None:
        self._map(_attach(name))
        if not 0 <= index < self.num_readers:
            self.close()
            raise ValueError(f"reader index {index} out of range for a ring of {self.num_readers} readers")
        self._at = _RSEQ0 + _LINE * index
        self._seq = int(self._ctrl[self._at])

    def recv(self, *, alive: Callable[[], object] | None = None, timeout: float | None = None) -> np.ndarray:
        """The next message's int64 words (a copy); waits for it (``alive``, ``timeout``: module docstring)."""
        k, ctrl = self._seq, self._ctrl
        if ctrl[_WSEQ] <= k:
            _wait(lambda: ctrl[_WSEQ] > k, self._last, alive, timeout, "a message")
        slot = self._slots[k % self.num_slots]
        msg = slot[1 : 1 + int(slot[0])].copy()
        ctrl[self._at] = k + 1  # after the copy: from here on the writer may reuse the slot
        self._seq = k + 1
        self._last = time.monotonic()
        return msg
