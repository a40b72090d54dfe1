"""The block pool: physical KV blocks, reference counts, the free queue and the prefix-cache index.

Usable alone (no manager, no engine)::

    pool = BlockPool(num_blocks=1024)          # block 0 is the null block by default
    ids = pool.allocate(4)                     # ref count 1 each, O(n)
    pool.touch(ids[:2])                        # a second holder shares two of them
    pool.free(reversed(ids))                   # ref count down; blocks at 0 go back to the free queue

**Free queue.** Blocks with ref count 0, in eviction order: allocation pops from the head. A freed block
that holds no cached content goes to the head (reused first: nothing is lost), a freed cached block goes
to the tail (least recently used is evicted first). Callers free a sequence's blocks tail-first, so within
one sequence the longest-chain tails are evicted before the prefix they extend. The queue is a
``collections.OrderedDict`` used as a doubly linked list: CPython implements it as a C doubly linked list
plus a hash index, so pop-from-head, push-to-head/tail and removal from the middle (a prefix-cache hit on a
free block) are all O(1) without a scan, and allocating n blocks is O(n). A hand-written Python linked
list gives the same complexity at ~5x the constant (measured in ``benchmarks/test_bench_cache.py``).

**Prefix cache index.** ``block_hash -> block id`` for full blocks whose content is known. Eviction is lazy:
a freed cached block keeps its content (and stays findable) until it is popped for reuse. Each cached block
records its tokens, a unique serial number and the serial of its parent block at registration;
:meth:`BlockPool.verify` checks both, so a hit proves the whole prefix equal by induction, whatever the
hash function does: a hash collision costs a hit, never correctness.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from .stats import CacheStats

__all__ = ["FreeBlockQueue", "BlockPool", "ROOT_SERIAL"]

ROOT_SERIAL = 0  # the "parent serial" of a first block


class FreeBlockQueue:
    """Block ids in eviction order (head = next to be reused); all operations O(1) per block."""

    __slots__ = ("_od",)

    def __init__(self, block_ids: Iterable[int] = ()) -> None:
        self._od: OrderedDict[int, None] = OrderedDict.fromkeys(block_ids)

    def __len__(self) -> int:
        return len(self._od)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._od

    def __iter__(self):
        """Head to tail (eviction order)."""
        return iter(self._od)

    def popleft_n(self, n: int) -> list[int]:
        """Remove and return the ``n`` blocks at the head; the caller checks ``n <= len(self)``."""
        pop = self._od.popitem
        return [pop(last=False)[0] for _ in range(n)]

    def append(self, block_id: int) -> None:
        """Put ``block_id`` at the tail (evicted last)."""
        self._od[block_id] = None

    def appendleft(self, block_id: int) -> None:
        """Put ``block_id`` at the head (reused first)."""
        self._od[block_id] = None
        self._od.move_to_end(block_id, last=False)

    def remove(self, block_id: int) -> None:
        """Remove ``block_id`` from anywhere in the queue (KeyError if absent)."""
        del self._od[block_id]


class BlockPool:
    """``num_blocks`` physical blocks with ref counts, a free queue and the prefix-cache index.

    Args:
        num_blocks: physical blocks in the KV tensor (dim 2 of ``[L, 2, num_blocks, block_size, H, D]``).
        reserve_null_block: keep block 0 out of circulation as the padding target of block tables.
        stats: counters to update (``evictions``); a fresh :class:`CacheStats` by default.
        evicted_memory: how many recently evicted hashes to remember, to tell "evicted" misses apart.
    """

    def __init__(self, num_blocks: int, *, reserve_null_block: bool = True, stats: CacheStats | None = None,
                 evicted_memory: int | None = None) -> None:
        first = 1 if reserve_null_block else 0
        if not isinstance(num_blocks, int) or num_blocks < first + 1:
            raise ValueError(f"num_blocks must be an int >= {first + 1} (reserve_null_block={reserve_null_block}), "
                             f"got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.null_block_id: int | None = 0 if reserve_null_block else None
        self.num_usable_blocks = num_blocks - first
        self.stats = stats if stats is not None else CacheStats()
        self.ref_counts: list[int] = [0] * num_blocks
        if reserve_null_block:
            self.ref_counts[0] = 1  # permanently held by the pool
        self.free_queue = FreeBlockQueue(range(first, num_blocks))
        # prefix-cache metadata, indexed by block id (None / 0 when the block holds no cached content)
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self._serials: list[int] = [0] * num_blocks
        self._parent_serials: list[int] = [0] * num_blocks
        self._tokens: list[tuple | None] = [None] * num_blocks
        self._extra_keys: list[tuple | None] = [None] * num_blocks
        self._plain_first: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._salted_first: dict[bytes, int] = {}  # tokens-only hash of first blocks cached with extra keys
        self._evicted: OrderedDict[bytes, None] = OrderedDict()
        self._evicted_cap = evicted_memory if evicted_memory is not None else min(1 << 20, max(1024, 2 * num_blocks))
        self._next_serial = ROOT_SERIAL + 1

    # ---------------------------------------------------------------- allocation
    @property
    def num_free(self) -> int:
        """Blocks with ref count 0 (some may hold evictable cached content)."""
        return len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the head of the free queue (evicting cached content); ref count 1 each."""
        if n < 0 or n > len(self.free_queue):
            raise ValueError(f"cannot allocate {n} blocks: {len(self.free_queue)} free of "
                             f"{self.num_usable_blocks} usable")
        ids = self.free_queue.popleft_n(n)
        refs, hashes = self.ref_counts, self.block_hashes
        for b in ids:
            if hashes[b] is not None:
                self._evict(b)
            refs[b] = 1
        return ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a holder to each block (a prefix hit or a fork); free blocks leave the free queue in O(1)."""
        refs, fq = self.ref_counts, self.free_queue
        for b in block_ids:
            if refs[b] == 0:
                fq.remove(b)
            refs[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one holder of each block, in the given order (pass a sequence tail-first).

        Blocks reaching ref count 0 return to the free queue: cached ones at the tail, others at the head.
        Raises ValueError on a block that is already free (or the null block) and leaves the pool as it was.
        """
        refs, hashes, fq = self.ref_counts, self.block_hashes, self.free_queue
        done: list[int] = []
        for b in block_ids:
            r = refs[b]
            if r <= 0 or b == self.null_block_id:
                self._undo_free(done)
                what = "the null block" if b == self.null_block_id else "already free"
                raise ValueError(f"cannot free block {b}: {what} (double free?)")
            refs[b] = r - 1
            if r == 1:
                if hashes[b] is None:
                    fq.appendleft(b)
                else:
                    fq.append(b)
            done.append(b)

    def _undo_free(self, done: list[int]) -> None:
        for b in reversed(done):
            if self.ref_counts[b] == 0:
                self.free_queue.remove(b)
            self.ref_counts[b] += 1

    # ---------------------------------------------------------------- prefix cache
    def lookup(self, block_hash: bytes) -> int | None:
        """The block cached under ``block_hash`` (held or free), or None."""
        return self._cached.get(block_hash)

    def verify(self, block_id: int, token_ids: tuple, parent_serial: int, extra_keys: tuple | None) -> bool:
        """True if ``block_id`` holds exactly ``token_ids`` after the parent with serial ``parent_serial``
        (and, for a first block, was cached with the same ``extra_keys``)."""
        return (self._parent_serials[block_id] == parent_serial and self._tokens[block_id] == token_ids
                and self._extra_keys[block_id] == extra_keys)

    def serial(self, block_id: int) -> int:
        """The unique serial of the cached content of ``block_id`` (0 if it holds none)."""
        return self._serials[block_id]

    def cache_block(self, block_id: int, block_hash: bytes, token_ids: tuple, parent_serial: int,
                    extra_keys: tuple | None, *, plain_first_hash: bytes | None = None) -> int:
        """Register the full, held ``block_id`` under ``block_hash``; returns its new serial.

        ``extra_keys`` is the request's extra keys for a first block, None for later blocks;
        ``plain_first_hash`` (first blocks with extra keys only) is the hash of its tokens without them,
        used to explain misses caused by a different cache salt.
        """
        if self.ref_counts[block_id] <= 0 or block_id == self.null_block_id:
            raise ValueError(f"block {block_id} must be held (ref count > 0) to be cached")
        if self.block_hashes[block_id] is not None:
            raise ValueError(f"block {block_id} is already cached")
        if block_hash in self._cached:
            raise ValueError("block_hash is already cached by another block")
        serial = self._next_serial
        self._next_serial += 1
        self.block_hashes[block_id] = block_hash
        self._serials[block_id] = serial
        self._parent_serials[block_id] = parent_serial
        self._tokens[block_id] = token_ids
        self._extra_keys[block_id] = extra_keys
        self._cached[block_hash] = block_id
        self._evicted.pop(block_hash, None)
        if plain_first_hash is not None:
            self._plain_first[block_id] = plain_first_hash
            self._salted_first[plain_first_hash] = self._salted_first.get(plain_first_hash, 0) + 1
        return serial

    def uncache(self, block_id: int) -> None:
        """Drop the cached content of ``block_id`` now (its KV is not valid); not counted as an eviction."""
        if self.block_hashes[block_id] is None:
            raise ValueError(f"block {block_id} holds no cached content")
        self._evict(block_id, count=False)
        if self.ref_counts[block_id] == 0:  # a free block without content is reused first
            self.free_queue.remove(block_id)
            self.free_queue.appendleft(block_id)

    def _evict(self, block_id: int, *, count: bool = True) -> None:
        h = self.block_hashes[block_id]
        del self._cached[h]
        self.block_hashes[block_id] = None
        self._serials[block_id] = 0
        self._tokens[block_id] = None
        self._extra_keys[block_id] = None
        plain = self._plain_first[block_id]
        if plain is not None:
            self._plain_first[block_id] = None
            left = self._salted_first[plain] - 1
            if left:
                self._salted_first[plain] = left
            else:
                del self._salted_first[plain]
        self._parent_serials[block_id] = 0
        if count:
            self._evicted[h] = None
            if len(self._evicted) > self._evicted_cap:
                self._evicted.popitem(last=False)
            self.stats.evictions += 1

    def was_evicted(self, block_hash: bytes) -> bool:
        """True if ``block_hash`` was cached and evicted recently (and not cached again since)."""
        return block_hash in self._evicted

    def cached_with_other_extra_keys(self, plain_first_hash: bytes) -> bool:
        """True if a first block with these tokens is cached under some non-empty extra keys."""
        return plain_first_hash in self._salted_first

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently holding cached (findable) content, held or free."""
        return len(self._cached)

    def evict_free_cached(self) -> int:
        """Drop the cached content of every free block (they move to the head); returns how many."""
        fq = self.free_queue
        victims = [b for b in fq if self.block_hashes[b] is not None]
        for b in victims:
            self._evict(b)
            fq.remove(b)
            fq.appendleft(b)
        return len(victims)

    def check_invariants(self) -> None:
        """O(num_blocks) self-check for tests and debugging; raises AssertionError on corruption."""
        fq = set(self.free_queue)
        assert len(fq) == len(self.free_queue), "free queue holds a block twice"
        for b in range(self.num_blocks):
            r = self.ref_counts[b]
            if b == self.null_block_id:
                assert r == 1 and b not in fq, "null block in circulation"
                continue
            assert r >= 0, f"block {b} has negative ref count"
            assert (r == 0) == (b in fq), f"block {b}: ref count {r} but in free queue: {b in fq}"
            h = self.block_hashes[b]
            assert h is None or self._cached.get(h) == b, f"block {b} hash not indexed"
        assert len(self._cached) == sum(h is not None for h in self.block_hashes), "stale cache index"
