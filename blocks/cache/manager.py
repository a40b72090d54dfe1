"""KV cache manager: the facade the scheduler calls (prefix lookup, slot allocation, free, fork, CoW).

Usable alone::

    from blocks.cache.manager import KVCacheManager
    kv = KVCacheManager(num_blocks=1024, block_size=16, enable_prefix_caching=True)
    blocks, num_computed = kv.get_computed_blocks("r1", prompt_ids)            # longest cached prefix
    new = kv.allocate_slots("r1", len(prompt_ids) - num_computed, num_computed_tokens=num_computed,
                            token_ids=prompt_ids, computed_blocks=blocks)     # None -> preempt someone
    ... each decode step: kv.allocate_slots("r1", 1, num_computed_tokens=n, token_ids=all_ids)
    kv.fork("r1", "r1-sample2")                                              # share blocks (n > 1)
    copies = kv.take_copies()                                                # CoW (src, dst) for the runner
    kv.free("r1")

Block tables are Python lists of physical block ids; token ``t`` of a request lives in block
``table[t // block_size]`` at offset ``t % block_size`` (slot ``block_id * block_size + offset``).

**Calling pattern.** A caller may skip ``allocate_slots`` while a request's new tokens fit in the slots it
already holds (``get_num_slots``); blocks filled meanwhile get registered at the next call. Exception: a
request that shares blocks after :meth:`fork` must call ``allocate_slots`` before every write, because the
call is where copy-on-write happens. ``allocate_slots`` for a running request without new blocks or copies
is a short hot path (~0.6 µs on the dev box).

**Copy-on-write.** After :meth:`fork` both requests hold the same blocks. When a request writes a token
into a block that another request still holds, the block is replaced in the writer's table by a fresh one;
if the block already held tokens of the writer (a partially filled block), a ``(src, dst)`` copy is queued
for the runner (:meth:`take_copies`), to run before the step's forward pass. ``allocate_slots`` returns the
ids appended to the end of the table; a CoW replacement changes an existing entry, so callers that mirror
tables should re-read :meth:`get_block_table` when :meth:`take_replacements` reports one.

**Prefix caching.** Full blocks of ``token_ids`` are registered under a chained hash (see
:mod:`blocks.cache.hashing`) and stay findable after :meth:`free` until their block is reused (lazy LRU
eviction, see :mod:`blocks.cache.block_pool`). Hits are verified token by token and link by link.
Request ids must be unique among live and waiting requests; a request's ``token_ids`` only grow.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .block_pool import ROOT_SERIAL, BlockPool
from .hashing import HashFn, encode_extra_keys, sha256_hash
from .prefix_cache import NO_CACHING, PrefixCache
from .stats import CacheStats, MissReason

__all__ = ["KVCacheManager"]

_PENDING_CAP = 4096  # hash chains of looked-up but not yet allocated requests kept for reuse


class _Request:
    __slots__ = ("block_ids", "hashes", "extra_keys", "extra", "num_cached_blocks", "last_serial")

    def __init__(self, block_ids: list[int], hashes: list[bytes], extra_keys: tuple,
                 extra: bytes) -> None:
        self.block_ids = block_ids
        self.hashes = hashes  # chained hashes of the full blocks of token_ids seen so far
        self.extra_keys = extra_keys
        self.extra = extra
        # leading blocks registered (or verified) in the prefix cache; NO_CACHING when caching is off or a
        # collision stopped it (one comparison in the hot path then skips registration)
        self.num_cached_blocks = 0
        self.last_serial = ROOT_SERIAL

    def clone(self) -> _Request:
        c = _Request(list(self.block_ids), list(self.hashes), self.extra_keys, self.extra)
        c.num_cached_blocks, c.last_serial = self.num_cached_blocks, self.last_serial
        return c


class KVCacheManager:
    """Paged KV cache bookkeeping for many requests over one :class:`BlockPool`. Touches no tensors.

    Args:
        num_blocks: physical blocks of the KV tensor (including the null block if reserved).
        block_size: tokens per block.
        enable_prefix_caching: register full blocks and serve prefix hits.
        reserve_null_block: keep block 0 for padding (never handed out).
        hash_fn: ``bytes -> bytes`` block hash (default SHA-256); injectable to test collisions.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False,
                 reserve_null_block: bool = True, hash_fn: HashFn = sha256_hash) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = CacheStats()
        self.pool = BlockPool(num_blocks, reserve_null_block=reserve_null_block, stats=self.stats)
        self.null_block_id = self.pool.null_block_id
        self._refs = self.pool.ref_counts
        self._prefix = PrefixCache(self.pool, block_size, hash_fn)
        self._requests: dict[str, _Request] = {}
        self._pending: OrderedDict[str, tuple[tuple, list[bytes]]] = OrderedDict()
        self._copies: list[tuple[int, int]] = []
        self._replacements: dict[str, list[tuple[int, int]]] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can be handed out (``num_blocks`` minus the null block)."""
        return self.pool.num_usable_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0 (free or holding evictable cached content). A property."""
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests, in [0, 1]."""
        return 1.0 - self.pool.num_free / self.pool.num_usable_blocks

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def num_requests(self) -> int:
        """Requests currently holding blocks."""
        return len(self._requests)

    def get_block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table (physical block ids, in token order)."""
        return list(self._get(request_id, "request_id").block_ids)

    def get_num_slots(self, request_id: str) -> int:
        """Token slots the request holds: ``len(block_table) * block_size``."""
        return len(self._get(request_id, "request_id").block_ids) * self.block_size

    def _get(self, request_id: str, field: str) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"{field} {request_id!r} holds no blocks (unknown, or already freed)")
        return req

    # ------------------------------------------------------------------ prefix lookup
    def _chain(self, request_id: str, extra_keys: tuple) -> list[bytes]:
        entry = self._pending.get(request_id)
        if entry is not None and entry[0] == extra_keys:
            self._pending.move_to_end(request_id)
            return entry[1]
        hashes: list[bytes] = []
        self._pending[request_id] = (extra_keys, hashes)
        if len(self._pending) > _PENDING_CAP:
            self._pending.popitem(last=False)
        return hashes

    def get_computed_blocks(self, request_id: str, token_ids: Sequence[int], *, extra_keys: tuple = ()
                            ) -> tuple[list[int], int]:
        """Longest cached prefix of ``token_ids``, in full blocks, capped so at least the last token is
        recomputed. Returns ``(block_ids, num_computed_tokens)``; takes no reference; counts a query/hit.

        Time is proportional to the hit length (one hash and one verification per block). Pass the
        returned blocks to :meth:`allocate_slots` as ``computed_blocks`` in the same scheduler step.
        """
        st = self.stats
        n = len(token_ids)
        st.prefix_queries += 1
        st.query_tokens += n
        if not self.enable_prefix_caching:
            st.miss_reasons[MissReason.CACHING_DISABLED] += 1
            return [], 0
        extra = encode_extra_keys(extra_keys)
        bs = self.block_size
        max_blocks = (n - 1) // bs if n else 0
        if max_blocks == 0:
            st.miss_reasons[MissReason.PROMPT_TOO_SHORT] += 1
            return [], 0
        hashes = self._chain(request_id, extra_keys)
        blocks, collided = self._prefix.find(hashes, token_ids, max_blocks, extra, extra_keys)
        if blocks:
            st.prefix_hits += 1
            st.hit_tokens += len(blocks) * bs
        else:
            st.miss_reasons[self._prefix.miss_reason(hashes[0], token_ids, extra_keys, collided)] += 1
        return blocks, len(blocks) * bs

    # ------------------------------------------------------------------ allocation
    def _plan(self, request_id: str, num_new_tokens: int, num_computed_tokens: int,
              computed_blocks: Sequence[int], token_ids: Sequence[int] = (), extra_keys: tuple = ()
              ) -> tuple[_Request | None, int, list[int], int]:
        """Validate and size an allocation without changing anything.

        Returns ``(request or None, blocks to append, table indices needing copy-on-write, free blocks the
        claim of computed_blocks takes)``.
        """
        if not isinstance(num_new_tokens, int) or num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be an int >= 0, got {num_new_tokens!r}")
        if not isinstance(num_computed_tokens, int) or num_computed_tokens < 0:
            raise ValueError(f"num_computed_tokens must be an int >= 0, got {num_computed_tokens!r}")
        bs, pool = self.block_size, self.pool
        total = num_computed_tokens + num_new_tokens
        need = -(-total // bs)
        if need > pool.num_usable_blocks:
            raise ValueError(f"request {request_id!r} needs {need} blocks for {total} tokens but the pool has only "
                             f"{pool.num_usable_blocks} usable blocks (num_blocks={self.num_blocks}, "
                             f"block_size={bs}); it can never fit")
        req = self._requests.get(request_id)
        if req is None:
            encode_extra_keys(extra_keys)  # validates
            ncb = len(computed_blocks)
            if num_computed_tokens != ncb * bs:
                raise ValueError(
                    f"num_computed_tokens={num_computed_tokens} must equal len(computed_blocks) * block_size = "
                    f"{ncb * bs} on the first allocate_slots call of request {request_id!r} (it holds no blocks: "
                    "new, or finished and freed)")
            claim = 0
            refs, hashes = pool.ref_counts, pool.block_hashes
            for b in computed_blocks:
                if not (0 <= b < self.num_blocks) or b == self.null_block_id or hashes[b] is None:
                    raise ValueError(f"computed_blocks holds block {b}, which is not a cached block "
                                     "(pass the list returned by get_computed_blocks in the same step)")
                claim += refs[b] == 0
            if ncb > 1 and len(set(computed_blocks)) != ncb:
                raise ValueError("computed_blocks holds a block twice")
            if ncb:
                self._check_computed(computed_blocks, token_ids, extra_keys)
            return None, max(0, need - ncb), [], claim
        if computed_blocks:
            raise ValueError(f"computed_blocks may only be passed on the first allocate_slots call of request "
                             f"{request_id!r}, which already holds {len(req.block_ids)} blocks")
        if num_computed_tokens > len(req.block_ids) * bs:
            raise ValueError(f"num_computed_tokens={num_computed_tokens} exceeds the {len(req.block_ids) * bs} "
                             f"token slots request {request_id!r} holds")
        table, refs = req.block_ids, pool.ref_counts
        cow = [i for i in range(num_computed_tokens // bs, min(len(table), need)) if refs[table[i]] > 1]
        if not num_new_tokens:
            cow = []  # nothing is written
        return req, max(0, need - len(table)), cow, 0

    def _check_computed(self, computed_blocks: Sequence[int], token_ids: Sequence[int], extra_keys: tuple) -> None:
        """computed_blocks must still hold the prefix of token_ids (nothing evicted and reused them since the
        lookup): re-verify the chain, O(len(computed_blocks))."""
        bs, pool = self.block_size, self.pool
        if len(token_ids) < len(computed_blocks) * bs:
            raise ValueError(f"token_ids (len {len(token_ids)}) must cover the {len(computed_blocks) * bs} tokens "
                             "of computed_blocks so the hit can be verified")
        parent = ROOT_SERIAL
        for i, b in enumerate(computed_blocks):
            if not pool.verify(b, tuple(token_ids[i * bs:(i + 1) * bs]), parent, None if i else extra_keys):
                raise ValueError(f"computed_blocks[{i}] (block {b}) no longer holds this request's prefix: it was "
                                 "evicted and reused since get_computed_blocks (call both in the same step)")
            parent = pool.serial(b)

    def can_allocate(self, request_id: str, num_new_tokens: int, *, num_computed_tokens: int = 0,
                     token_ids: Sequence[int] = (), computed_blocks: Sequence[int] = (),
                     extra_keys: tuple = ()) -> bool:
        """Whether :meth:`allocate_slots` with these arguments would return blocks now (changes nothing)."""
        _, num_append, cow, claim = self._plan(request_id, num_new_tokens, num_computed_tokens, computed_blocks,
                                               token_ids, extra_keys)
        return num_append + len(cow) <= self.pool.num_free - claim

    def allocate_slots(self, request_id: str, num_new_tokens: int, *, num_computed_tokens: int = 0,
                       token_ids: Sequence[int] = (), computed_blocks: Sequence[int] = (),
                       extra_keys: tuple = ()) -> list[int] | None:
        """Grow the request's block table to hold ``num_computed_tokens + num_new_tokens`` tokens.

        On the first call for a request, claims ``computed_blocks`` (ref count up, removed from the free
        queue); ``num_computed_tokens`` must then be ``len(computed_blocks) * block_size``. ``token_ids`` are
        the request's known tokens (prompt + output so far); full blocks among them that this step fills get
        registered in the prefix cache. Writing into a shared partially filled block does copy-on-write (the
        ``(src, dst)`` pair is queued, see :meth:`take_copies`). Returns the block ids appended to the table
        (maybe ``[]``), or None if there are not enough free blocks -- in which case nothing changed.

        Raises ValueError (changing nothing) on inconsistent arguments and when the request could never fit
        in the pool.
        """
        req = self._requests.get(request_id)
        if (req is None or computed_blocks or type(num_new_tokens) is not int or type(num_computed_tokens) is not int
                or num_new_tokens < 0 or num_computed_tokens < 0):
            return self._allocate(request_id, num_new_tokens, num_computed_tokens, token_ids, computed_blocks,
                                  extra_keys)
        # Hot path (called per running sequence per step): no copy-on-write, at most a few new blocks.
        bs = self.block_size
        table = req.block_ids
        have = len(table)
        if num_computed_tokens > have * bs:  # inconsistent: the general path raises
            return self._allocate(request_id, num_new_tokens, num_computed_tokens, token_ids, (), extra_keys)
        total = num_computed_tokens + num_new_tokens
        need = -(-total // bs)
        if num_new_tokens:
            first = num_computed_tokens // bs
            last = (need if need < have else have) - 1  # last block of the table this step writes into
            if first <= last:
                refs = self._refs
                if refs[table[first]] > 1 or (last > first and any(refs[table[i]] > 1
                                                                   for i in range(first + 1, last + 1))):
                    return self._allocate(request_id, num_new_tokens, num_computed_tokens, token_ids, (), extra_keys)
        if need > have:
            pool = self.pool
            if need - have > len(pool.free_queue):
                if need > pool.num_usable_blocks:  # can never fit: the general path raises
                    return self._allocate(request_id, num_new_tokens, num_computed_tokens, token_ids, (), extra_keys)
                return None
            new = pool.allocate(need - have)
            table.extend(new)
        else:
            new = []
        n = len(token_ids)
        if (total if total < n else n) // bs > req.num_cached_blocks:
            self._prefix.register(req, token_ids, total)
        return new

    def _allocate(self, request_id: str, num_new_tokens: int, num_computed_tokens: int, token_ids: Sequence[int],
                  computed_blocks: Sequence[int], extra_keys: tuple) -> list[int] | None:
        """The general path of :meth:`allocate_slots` (first call, new blocks, copy-on-write, errors)."""
        req, num_append, cow, claim = self._plan(request_id, num_new_tokens, num_computed_tokens, computed_blocks,
                                                 token_ids, extra_keys)
        pool = self.pool
        if num_append + len(cow) > pool.num_free - claim:
            return None
        total = num_computed_tokens + num_new_tokens
        if req is None:
            extra = encode_extra_keys(extra_keys)
            entry = self._pending.pop(request_id, None)
            hashes = entry[1] if entry is not None and entry[0] == extra_keys else []
            blocks = list(computed_blocks)
            pool.touch(blocks)
            req = _Request(blocks, hashes, extra_keys, extra)
            if not self.enable_prefix_caching:
                req.num_cached_blocks = NO_CACHING
            elif blocks:
                req.num_cached_blocks = len(blocks)
                req.last_serial = pool.serial(blocks[-1])
            self._requests[request_id] = req
        new = pool.allocate(num_append + len(cow))
        if cow:
            self._copy_on_write(request_id, req, cow, new[num_append:], num_computed_tokens)
            new = new[:num_append]
        req.block_ids.extend(new)
        n = len(token_ids)
        if (total if total < n else n) // self.block_size > req.num_cached_blocks:
            self._prefix.register(req, token_ids, total)
        return new

    def _copy_on_write(self, request_id: str, req: _Request, cow: list[int], fresh: list[int],
                       num_computed_tokens: int) -> None:
        bs, table = self.block_size, req.block_ids
        partial = num_computed_tokens // bs if num_computed_tokens % bs else -1
        released = []
        for i, dst in zip(cow, fresh):
            src = table[i]
            if i == partial:
                self._copies.append((src, dst))
                self.stats.cow_copies += 1
            table[i] = dst
            released.append(src)
            self._replacements.setdefault(request_id, []).append((i, dst))
        self.pool.free(released)  # each src has other holders: only its ref count drops

    # ------------------------------------------------------------------ release, sharing, copies
    def free(self, request_id: str, *, num_computed_tokens: int | None = None) -> None:
        """Release all blocks of the request, tail first (cached blocks stay findable until evicted).

        Blocks get registered in the prefix cache when ``allocate_slots`` is called for the step that
        computes them. A request freed before that step's forward pass ran (a scheduler preempting a request
        it already scheduled in the same step) must pass ``num_computed_tokens`` (the tokens whose KV really
        exists): blocks beyond it are dropped from the prefix cache instead of serving uncomputed KV.

        Raises ValueError for an unknown or already freed request; the pool is unchanged then.
        """
        req = self._get(request_id, "request_id")
        if num_computed_tokens is not None:
            cap = len(req.block_ids) * self.block_size
            if not isinstance(num_computed_tokens, int) or not 0 <= num_computed_tokens <= cap:
                raise ValueError(f"num_computed_tokens must be an int in [0, {cap}] for request "
                                 f"{request_id!r}, got {num_computed_tokens!r}")
            pool = self.pool
            for b in req.block_ids[num_computed_tokens // self.block_size:]:
                if pool.block_hashes[b] is not None:
                    pool.uncache(b)
        self.pool.free(req.block_ids[::-1])
        del self._requests[request_id]
        self._replacements.pop(request_id, None)
        self._pending.pop(request_id, None)

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give ``child_id`` the parent's block table, sharing every block (ref count up, no copies now)."""
        parent = self._get(parent_id, "parent_id")
        if child_id in self._requests:
            raise ValueError(f"child_id {child_id!r} already holds blocks")
        self.pool.touch(parent.block_ids)
        self._requests[child_id] = parent.clone()

    def take_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write ``(src, dst)`` block pairs queued since the last call, in order.

        Run them (all layers, K and V; see :mod:`blocks.cache.block_copy`) before the step's forward pass.
        Later pairs may read blocks written by earlier ones: ``block_copy`` handles that ordering.
        """
        out, self._copies = self._copies, []
        return out

    def take_replacements(self) -> dict[str, list[tuple[int, int]]]:
        """Copy-on-write table edits since the last call: ``{request_id: [(table_index, new_block_id)]}``."""
        out, self._replacements = self._replacements, {}
        return out

    def reset_prefix_cache(self) -> int:
        """Evict the cached content of every free block now; returns how many blocks were evicted.

        Blocks held by running requests keep their registration.
        """
        return self.pool.evict_free_cached()

    def check_invariants(self) -> None:
        """O(num_blocks + table sizes) consistency check for tests: ref counts equal holders, free + held =
        total, no block both free and held. Raises AssertionError."""
        self.pool.check_invariants()
        holders = [0] * self.num_blocks
        for req in self._requests.values():
            for b in req.block_ids:
                holders[b] += 1
        if self.null_block_id is not None:
            holders[self.null_block_id] = 1
        assert holders == self.pool.ref_counts, "ref counts differ from the number of holders"
        held = sum(1 for h in holders if h)
        assert held + self.pool.num_free == self.num_blocks, "free + held != total"
