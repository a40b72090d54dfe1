"""Hypothesis state machine over random interleavings of the KV cache manager's operations.

A shadow KV memory records, for every physical block slot, which (extra keys, token) was written there.
After every step each live request must read back exactly its own tokens through its block table: this
catches copy-on-write writes into blocks others read, wrong prefix hits (content, salt, evicted block)
and leaked or double-owned blocks. Pool invariants are checked after every step too.
"""

from __future__ import annotations

import hashlib

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

from blocks.cache.manager import KVCacheManager

SALTS = [(), ("salt-a",), (7, "lora")]
BASES = [[5, 3, 9, 1, 4, 4, 8, 2, 6, 0, 7, 3], [1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144]]


def _one_byte_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:1]


class _Seq:
    def __init__(self, tokens, salt, computed):
        self.tokens, self.salt, self.computed = tokens, salt, computed


class CacheMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    @initialize(block_size=st.sampled_from([1, 2, 3, 4, 5]), num_blocks=st.integers(6, 40),
                caching=st.booleans(), null=st.booleans(), weak_hash=st.booleans())
    def setup(self, block_size, num_blocks, caching, null, weak_hash):
        # weak_hash: a 1-byte hash, so collisions are frequent and only verification keeps hits correct
        kw = {"hash_fn": _one_byte_hash} if weak_hash else {}
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching, reserve_null_block=null,
                                 **kw)
        self.bs = block_size
        self.seqs: dict[str, _Seq] = {}
        self.shadow: dict[int, list] = {}
        self.counter = 0
        self.history: list[tuple[list[int], tuple]] = []  # prompts seen, to ask for again after evictions

    # ------------------------------------------------------------ helpers
    def _write(self, rid: str, start: int, end: int) -> None:
        """Apply queued copies (in order), then write tokens [start, end) of rid through its table."""
        for src, dst in self.kv.take_copies():
            event("copy-on-write copy")
            self.shadow[dst] = list(self.shadow.get(src, [None] * self.bs))
        seq = self.seqs[rid]
        table = self.kv.get_block_table(rid)
        for pos in range(start, end):
            block = table[pos // self.bs]
            assert block != self.kv.null_block_id
            self.shadow.setdefault(block, [None] * self.bs)[pos % self.bs] = (seq.salt, seq.tokens[pos])

    def _snapshot(self):
        return (list(self.kv.pool.ref_counts), self.kv.num_free_blocks,
                {r: self.kv.get_block_table(r) for r in self.seqs})

    def _allocate(self, rid, seq, n, **kw):
        """allocate_slots; None when it does not fit now, ValueError (checked) when it never can."""
        before = self._snapshot()
        copies_before = list(self.kv._copies)
        try:
            can = self.kv.can_allocate(rid, n, num_computed_tokens=seq.computed, token_ids=seq.tokens,
                                       extra_keys=seq.salt, **kw)
            new = self.kv.allocate_slots(rid, n, num_computed_tokens=seq.computed, token_ids=seq.tokens,
                                         extra_keys=seq.salt, **kw)
            assert (new is not None) == can, "can_allocate disagrees with allocate_slots"
        except ValueError as e:
            assert -(-(seq.computed + n) // self.bs) > self.kv.num_usable_blocks, e
            assert "can never fit" in str(e)
            new = None
        if new is None:
            event("allocate_slots returned None or raised")
            assert self._snapshot() == before, "a failed allocate_slots changed state"
            assert self.kv._copies == copies_before
        return new

    # ------------------------------------------------------------ rules
    @rule(target=requests, base=st.sampled_from(BASES), cut=st.integers(0, 12),
          suffix=st.lists(st.integers(0, 3), max_size=9), salt=st.sampled_from(SALTS), chunk=st.integers(1, 30))
    def add_request(self, base, cut, suffix, salt, chunk):
        tokens = base[:cut] + suffix
        if not tokens:
            tokens = [42]
        self.history.append((tokens, salt))
        return self._admit(tokens, salt, chunk)

    @precondition(lambda self: self.history)
    @rule(target=requests, data=st.data(), chunk=st.integers(1, 30))
    def add_seen_request(self, data, chunk):
        """Ask again for a prompt seen earlier (its blocks may be cached, evicted or reused by now)."""
        tokens, salt = data.draw(st.sampled_from(self.history))
        return self._admit(list(tokens), salt, chunk)

    def _admit(self, tokens, salt, chunk):
        rid = f"r{self.counter}"
        self.counter += 1
        blocks, num_computed = self.kv.get_computed_blocks(rid, tokens, extra_keys=salt)
        assert num_computed == len(blocks) * self.bs and num_computed < len(tokens)
        if blocks:
            event("prefix hit")
        for i, b in enumerate(blocks):  # a hit must hold exactly our tokens under our salt
            expect = [(salt, t) for t in tokens[i * self.bs:(i + 1) * self.bs]]
            assert self.shadow.get(b) == expect, "prefix hit served someone else's KV"
        seq = _Seq(list(tokens), salt, num_computed)
        n = min(chunk, len(tokens) - num_computed)
        if self._allocate(rid, seq, n, computed_blocks=blocks) is None:
            assert rid not in self.kv
            return rid  # never admitted: later rules treat it as unknown
        self.seqs[rid] = seq
        self._write(rid, num_computed, num_computed + n)
        seq.computed += n
        return rid

    @rule(rid=requests, token=st.integers(0, 3), lookahead=st.integers(0, 3))
    def step(self, rid, token, lookahead):
        seq = self.seqs.get(rid)
        if seq is None:
            return
        if seq.computed == len(seq.tokens):
            seq.tokens.append(token)  # decode: the sampled token's KV is computed this step
        n = len(seq.tokens) - seq.computed
        n = min(n, 1 + lookahead)
        start = seq.computed
        new = self._allocate(rid, seq, n)
        if new is not None:
            self._write(rid, start, start + n)
            seq.computed += n

    @rule(target=requests, parent=requests)
    def fork(self, parent):
        if parent not in self.seqs:
            return "dead"
        child = f"r{self.counter}"
        self.counter += 1
        self.kv.fork(parent, child)
        p = self.seqs[parent]
        self.seqs[child] = _Seq(list(p.tokens), p.salt, p.computed)
        return child

    @rule(rid=consumes(requests), uncomputed=st.booleans())
    def free(self, rid, uncomputed):
        if rid not in self.seqs:
            try:
                self.kv.free(rid)
            except ValueError as e:
                assert "holds no blocks" in str(e)
            else:
                raise AssertionError("freeing an unknown request did not raise")
            return
        seq = self.seqs.pop(rid)
        if uncomputed and seq.computed:
            # pretend the last step never ran: blocks past the shorter prefix must leave the cache
            keep = seq.computed // 2
            table = self.kv.get_block_table(rid)
            private = [b for b in table[keep // self.bs:] if self.kv.pool.ref_counts[b] == 1]
            self.kv.free(rid, num_computed_tokens=keep)
            for b in private:  # their KV "was never computed": a later hit on them would read garbage
                self.shadow[b] = ["garbage"] * self.bs
        else:
            self.kv.free(rid)

    @rule()
    def evict(self):
        self.kv.reset_prefix_cache()

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def misuse(self, data):
        rid = data.draw(st.sampled_from(sorted(self.seqs)))
        before = self._snapshot()
        too_many = (self.kv.num_usable_blocks + 1) * self.bs
        for call in (lambda: self.kv.allocate_slots(rid, too_many, num_computed_tokens=0),
                     lambda: self.kv.allocate_slots(rid, 1, num_computed_tokens=10**6),
                     lambda: self.kv.allocate_slots(rid, 1, computed_blocks=[0]),
                     lambda: self.kv.fork(rid, rid)):
            try:
                call()
            except ValueError:
                pass
            else:
                raise AssertionError("misuse did not raise")
        assert self._snapshot() == before

    # ------------------------------------------------------------ invariants
    @invariant()
    def pool_consistent(self):
        if not hasattr(self, "kv"):
            return
        if self.kv.stats.evictions:
            event("evictions happened")
        self.kv.check_invariants()
        held = {b for r in self.seqs for b in self.kv.get_block_table(r)}
        assert len(held) + self.kv.num_free_blocks == self.kv.num_usable_blocks
        assert 0.0 <= self.kv.usage <= 1.0

    @invariant()
    def every_request_reads_its_own_tokens(self):
        if not hasattr(self, "kv"):
            return
        for rid, seq in self.seqs.items():
            table = self.kv.get_block_table(rid)
            assert len(table) * self.bs >= seq.computed
            for pos in range(seq.computed):
                got = self.shadow.get(table[pos // self.bs], [None] * self.bs)[pos % self.bs]
                assert got == (seq.salt, seq.tokens[pos]), f"{rid} reads a clobbered slot at {pos}"

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        for rid in list(self.seqs):
            self.kv.free(rid)
        self.kv.check_invariants()
        assert self.kv.num_free_blocks == self.kv.num_usable_blocks, "blocks leaked"
        assert self.kv.usage == 0.0


CacheMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestCacheStateMachine = CacheMachine.TestCase
