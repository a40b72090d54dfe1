"""Prefix-cache walks over a :class:`~blocks.cache.block_pool.BlockPool`: lookup, registration, miss reasons.

A request's full blocks are identified by chained hashes (:mod:`blocks.cache.hashing`); the pool indexes
cached blocks by hash and :meth:`BlockPool.verify` checks tokens, extra keys and the parent link of every
candidate, so a hit is exact even when hashes collide. Lookup stops at the first miss and hashes lazily,
so its cost is proportional to the hit length (plus one block).
"""

from __future__ import annotations

from collections.abc import Sequence

from .block_pool import ROOT_SERIAL, BlockPool
from .hashing import HashFn, hash_block
from .stats import MissReason

__all__ = ["PrefixCache", "NO_CACHING"]

NO_CACHING = 1 << 62  # ``num_cached_blocks`` of a request whose blocks are not (or no longer) registered


class PrefixCache:
    """Stateless helper binding a pool, a block size and a hash function (all state lives in the pool and in
    the per-request objects passed in: ``block_ids``, ``hashes``, ``extra``, ``extra_keys``,
    ``num_cached_blocks``, ``last_serial``)."""

    def __init__(self, pool: BlockPool, block_size: int, hash_fn: HashFn) -> None:
        self.pool, self.block_size, self.hash_fn = pool, block_size, hash_fn

    def find(self, hashes: list[bytes], token_ids: Sequence[int], max_blocks: int, extra: bytes,
             extra_keys: tuple) -> tuple[list[int], bool]:
        """Cached blocks matching the first ``max_blocks`` full blocks of ``token_ids``.

        ``hashes`` is the request's hash chain so far (extended in place as blocks get hashed). Returns
        ``(block_ids, collided)``; ``collided`` is True when a hash matched a block of different content.
        """
        pool, hash_fn, bs = self.pool, self.hash_fn, self.block_size
        blocks: list[int] = []
        parent = ROOT_SERIAL
        for i in range(max_blocks):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            if i == len(hashes):
                hashes.append(hash_block(hashes[i - 1] if i else b"", tokens, b"" if i else extra, hash_fn=hash_fn))
            bid = pool.lookup(hashes[i])
            if bid is None:
                return blocks, False
            if not pool.verify(bid, tokens, parent, None if i else extra_keys):
                return blocks, True
            blocks.append(bid)
            parent = pool.serial(bid)
        return blocks, False

    def miss_reason(self, first_hash: bytes, token_ids: Sequence[int], extra_keys: tuple, collided: bool) -> str:
        """The :class:`MissReason` for a lookup that found no block."""
        pool = self.pool
        if collided:
            return MissReason.HASH_COLLISION
        if pool.was_evicted(first_hash):
            return MissReason.EVICTED
        plain = first_hash if not extra_keys else hash_block(b"", tuple(token_ids[:self.block_size]),
                                                             hash_fn=self.hash_fn)
        if pool.cached_with_other_extra_keys(plain) or (extra_keys and pool.lookup(plain) is not None):
            return MissReason.DIFFERENT_EXTRA_KEYS
        return MissReason.NO_SHARED_PREFIX

    def register(self, req, token_ids: Sequence[int], total: int) -> None:
        """Register the request's blocks that are full within ``min(total, len(token_ids))`` tokens.

        A block whose content is already cached elsewhere (two requests with one prompt in one step) is
        left unregistered and the chain continues through the cached twin. A collision, or a shared block
        cached under another chain, stops registration for the request (``num_cached_blocks = NO_CACHING``).
        """
        bs, pool, hash_fn = self.block_size, self.pool, self.hash_fn
        num_full = min(total, len(token_ids)) // bs
        hashes, table = req.hashes, req.block_ids
        parent = req.last_serial
        for i in range(req.num_cached_blocks, num_full):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            if i == len(hashes):
                hashes.append(hash_block(hashes[i - 1] if i else b"", tokens, b"" if i else req.extra,
                                         hash_fn=hash_fn))
            h = hashes[i]
            first_keys = None if i else req.extra_keys
            bid = pool.lookup(h)
            if bid is None:
                b = table[i]
                if pool.block_hashes[b] is not None:
                    req.num_cached_blocks = NO_CACHING
                    return
                plain = hash_block(b"", tokens, hash_fn=hash_fn) if i == 0 and req.extra_keys else None
                parent = pool.cache_block(b, h, tokens, parent, first_keys, plain_first_hash=plain)
            elif pool.verify(bid, tokens, parent, first_keys):
                parent = pool.serial(bid)
            else:
                req.num_cached_blocks = NO_CACHING
                return
            req.num_cached_blocks = i + 1
            req.last_serial = parent
