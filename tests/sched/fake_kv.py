"""A small stand-in KV cache manager with the agreed ``KVCacheManager`` API (tests only).

Used while ``blocks/cache/manager.py`` does not exist and, afterwards, as a second implementation
the scheduler must work with. Prefix caching hashes full blocks as a chain; freed blocks stay cached
until reused (LRU). No fork / copy-on-write.
"""

from __future__ import annotations

from collections import OrderedDict


class FakeKVCacheManager:
    def __init__(self, num_blocks, block_size, *, enable_prefix_caching=False, reserve_null_block=True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        first = 1 if reserve_null_block else 0
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(first, num_blocks))
        self._usable = num_blocks - first
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, object] = {}
        self._cache: dict[object, int] = {}
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[object]] = {}

    @property
    def num_usable_blocks(self):
        return self._usable

    @property
    def num_free_blocks(self):
        return len(self._free)

    @property
    def usage(self):
        return 1.0 - len(self._free) / self._usable

    def _chain(self, token_ids, num_full, extra_keys, start=(), parent=None):
        out = list(start)
        bs = self.block_size
        parent = out[-1] if out else parent
        for k in range(len(out), num_full):
            parent = hash((parent, tuple(token_ids[k * bs:(k + 1) * bs]), tuple(extra_keys)))
            out.append(parent)
        return out

    def get_computed_blocks(self, request_id, token_ids, *, extra_keys=()):
        if not self.enable_prefix_caching:
            return [], 0
        ids = []
        for h in self._chain(token_ids, (len(token_ids) - 1) // self.block_size, extra_keys):
            b = self._cache.get(h)
            if b is None:
                break
            ids.append(b)
        return ids, len(ids) * self.block_size

    def allocate_slots(self, request_id, num_new_tokens, *, num_computed_tokens=0, token_ids=(),
                       computed_blocks=(), extra_keys=()):
        table = self._tables.get(request_id)
        first = table is None
        claimed = list(computed_blocks) if first else []
        have = len(claimed) if first else len(table)
        need = max(0, -(-(num_computed_tokens + num_new_tokens) // self.block_size) - have)
        free_claimed = sum(1 for b in claimed if self._ref[b] == 0)
        if len(self._free) - free_claimed < need:
            return None
        if first:
            table = self._tables[request_id] = []
            self._hashes[request_id] = []
            for b in claimed:
                if self._ref[b] == 0:
                    del self._free[b]
                self._ref[b] += 1
                table.append(b)
        new = []
        for _ in range(need):
            b, _ = self._free.popitem(last=False)
            h = self._hash_of.pop(b, None)
            if h is not None and self._cache.get(h) == b:
                del self._cache[h]
            self._ref[b] = 1
            table.append(b)
            new.append(b)
        if self.enable_prefix_caching and token_ids:
            full = min(num_computed_tokens + num_new_tokens, len(token_ids)) // self.block_size
            hashes = self._hashes[request_id] = self._chain(token_ids, full, extra_keys, self._hashes[request_id])
            for k in range(full):
                b, h = table[k], hashes[k]
                if b not in self._hash_of and h not in self._cache:
                    self._hash_of[b] = h
                    self._cache[h] = b
        return new

    def free(self, request_id, *, num_computed_tokens=None):
        table = self._tables.pop(request_id)
        if num_computed_tokens is not None:  # blocks past it were registered but never computed
            for b in table[num_computed_tokens // self.block_size:]:
                h = self._hash_of.pop(b, None)
                if h is not None and self._cache.get(h) == b:
                    del self._cache[h]
        for b in reversed(table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
        self._hashes.pop(request_id, None)

    def get_block_table(self, request_id):
        return self._tables.get(request_id, [])

    def take_copies(self):
        return []

    def take_replacements(self):
        return {}
