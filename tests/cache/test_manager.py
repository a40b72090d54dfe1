"""Unit tests of the KV cache manager facade: prefix caching, eviction, salts, collisions, CoW, misuse."""

import hashlib
import random

import pytest

from blocks.cache.manager import KVCacheManager
from blocks.cache.stats import MissReason


def _prompt(rng, n, vocab=50_000):
    return [rng.randrange(vocab) for _ in range(n)]


def _run(kv, rid, tokens, *, extra_keys=()):
    """Admit a request the way a scheduler does: lookup, then allocate the rest of the prompt."""
    blocks, nc = kv.get_computed_blocks(rid, tokens, extra_keys=extra_keys)
    new = kv.allocate_slots(rid, len(tokens) - nc, num_computed_tokens=nc, token_ids=tokens,
                            computed_blocks=blocks, extra_keys=extra_keys)
    assert new is not None
    return blocks, nc


@pytest.mark.parametrize("bs", [1, 3, 16])
def test_prefix_hit_returns_the_same_physical_blocks_and_recomputes_the_last_token(bs):
    rng = random.Random(bs)
    kv = KVCacheManager(97, bs, enable_prefix_caching=True)
    tokens = _prompt(rng, 5 * bs + 1)
    _run(kv, "a", tokens)
    table_a = kv.get_block_table("a")
    free_before = kv.num_free_blocks
    blocks, nc = kv.get_computed_blocks("b", tokens)
    assert blocks == table_a[:5] and nc == 5 * bs
    assert kv.num_free_blocks == free_before, "a lookup must take no reference"
    # exactly k full blocks: the last block is dropped so its last token is recomputed
    exact = tokens[:4 * bs]
    blocks, nc = kv.get_computed_blocks("c", exact)
    assert blocks == table_a[:3] and nc == 3 * bs
    # a diverging token in block 2 stops the hit there
    other = list(tokens)
    other[2 * bs + bs // 2] += 1
    blocks, nc = kv.get_computed_blocks("d", other)
    assert blocks == table_a[:2]
    assert kv.stats.prefix_queries == 4 and kv.stats.prefix_hits == 3
    assert kv.stats.hit_tokens == (5 + 3 + 2) * bs


def test_freed_blocks_stay_cached_until_reused_then_miss_says_evicted():
    rng = random.Random(1)
    bs = 4
    kv = KVCacheManager(9, bs, enable_prefix_caching=True)  # 8 usable blocks
    tokens = _prompt(rng, 3 * bs + 1)
    _run(kv, "a", tokens)
    kv.free("a")
    assert kv.num_free_blocks == 8 and kv.pool.num_cached_blocks == 3
    blocks, _ = kv.get_computed_blocks("b", tokens)  # lazy eviction: still there after free
    assert len(blocks) == 3
    hog = kv.allocate_slots("hog", 8 * bs, token_ids=())  # every block, cached ones included
    assert hog is not None and kv.stats.evictions == 3
    kv.free("hog")
    blocks, nc = kv.get_computed_blocks("c", tokens)
    assert (blocks, nc) == ([], 0)
    assert kv.stats.miss_reasons[MissReason.EVICTED] == 1


def test_eviction_order_is_lru_across_requests_and_chain_tails_first():
    rng = random.Random(2)
    bs = 2
    kv = KVCacheManager(12, bs, enable_prefix_caching=True)  # 11 usable
    a, b = _prompt(rng, 3 * bs), _prompt(rng, 3 * bs)
    _run(kv, "a", a)
    _run(kv, "b", b)
    ta, tb = kv.get_block_table("a"), kv.get_block_table("b")
    kv.allocate_slots("scratch", 2 * bs)
    kv.free("a")  # freed first: least recently used
    kv.free("b")
    kv.free("scratch")  # uncached: reused before any cached block
    evicted = []
    taken = []
    for _ in range(kv.num_usable_blocks):
        before = kv.stats.evictions
        (blk,) = kv.allocate_slots(f"t{len(taken)}", bs)
        taken.append(blk)
        if kv.stats.evictions > before:
            evicted.append(blk)
    # a, b each registered their 3 full blocks: evict a's chain tail-first, then b's
    assert evicted == [ta[2], ta[1], ta[0], tb[2], tb[1], tb[0]]


def test_a_prefix_hit_refreshes_recency():
    rng = random.Random(4)
    bs = 3
    kv = KVCacheManager(7, bs, enable_prefix_caching=True)  # 6 usable
    a, b = _prompt(rng, 2 * bs), _prompt(rng, 2 * bs)
    _run(kv, "a", a)
    _run(kv, "b", b)
    kv.free("a")
    kv.free("b")
    _run(kv, "a2", a + [7])  # hits a's blocks: they become most recently used on free
    kv.free("a2")
    blocks, _ = kv.get_computed_blocks("x", a + [1])
    assert len(blocks) == 2
    kv.allocate_slots("hog", 4 * bs)  # 2 uncached + b's 2 cached blocks are reused first
    assert kv.get_computed_blocks("y", b + [1])[0] == []
    assert len(kv.get_computed_blocks("z", a + [1])[0]) == 2


def test_cache_salt_isolation_and_actionable_miss_reason():
    rng = random.Random(5)
    bs = 4
    kv = KVCacheManager(64, bs, enable_prefix_caching=True)
    tokens = _prompt(rng, 5 * bs)
    _run(kv, "a", tokens, extra_keys=("salt-1",))
    assert kv.get_computed_blocks("b", tokens, extra_keys=("salt-2",)) == ([], 0)
    assert kv.get_computed_blocks("c", tokens) == ([], 0)
    assert kv.stats.miss_reasons[MissReason.DIFFERENT_EXTRA_KEYS] == 2
    blocks, nc = kv.get_computed_blocks("d", tokens, extra_keys=("salt-1",))
    assert blocks == kv.get_block_table("a")[:4] and nc == 4 * bs
    _run(kv, "e", tokens)  # unsalted copy of the same prompt: its own blocks
    assert not set(kv.get_block_table("e")) & set(kv.get_block_table("a"))
    assert kv.stats.miss_reasons[MissReason.DIFFERENT_EXTRA_KEYS] == 3  # e's own lookup missed too
    assert kv.get_computed_blocks("f", tokens, extra_keys=("salt-3",)) == ([], 0)
    assert kv.stats.miss_reasons[MissReason.DIFFERENT_EXTRA_KEYS] == 4


def test_miss_reasons_for_short_prompts_disabled_caching_and_new_prefixes():
    rng = random.Random(6)
    kv = KVCacheManager(32, 8, enable_prefix_caching=True)
    kv.get_computed_blocks("a", _prompt(rng, 8))  # 8 tokens: only 7 could come from the cache
    kv.get_computed_blocks("b", _prompt(rng, 30))
    off = KVCacheManager(32, 8)
    off.get_computed_blocks("c", _prompt(rng, 30))
    assert kv.stats.miss_reasons == {MissReason.PROMPT_TOO_SHORT: 1, MissReason.NO_SHARED_PREFIX: 1}
    assert off.stats.miss_reasons == {MissReason.CACHING_DISABLED: 1}
    assert kv.stats.snapshot()["prefix_queries"] == 2 and kv.stats.hit_rate == 0.0


def _hash_ignoring_tokens(data: bytes) -> bytes:
    """A broken hash: only the length of the input counts, so every block of a size collides."""
    return hashlib.sha256(str(len(data)).encode()).digest()


def test_forced_hash_collision_is_detected_and_never_reuses_wrong_kv():
    rng = random.Random(7)
    bs = 4
    kv = KVCacheManager(64, bs, enable_prefix_caching=True, hash_fn=_hash_ignoring_tokens)
    a = _prompt(rng, 3 * bs + 1)
    _run(kv, "a", a)
    b = _prompt(rng, 3 * bs + 1)  # different tokens, same (broken) hashes
    assert kv.pool.lookup(_hash_ignoring_tokens(b"x" * (8 * bs))) is not None, "the collision is real"
    assert kv.get_computed_blocks("b", b) == ([], 0)
    assert kv.stats.miss_reasons[MissReason.HASH_COLLISION] == 1
    _run(kv, "b", b)  # b's blocks must not be chained onto a's content either
    c = a[:bs] + b[bs:]  # a's first block, then b's: only the first block may hit
    blocks, nc = kv.get_computed_blocks("c", c)
    assert blocks == kv.get_block_table("a")[:1] and nc == bs
    kv.check_invariants()


def test_without_verification_the_forced_collision_would_hand_out_wrong_kv(monkeypatch):
    """Shows the collision test above can fail: with verification off, b gets a's blocks."""
    rng = random.Random(7)
    kv = KVCacheManager(64, 4, enable_prefix_caching=True, hash_fn=_hash_ignoring_tokens)
    a, b = _prompt(rng, 13), _prompt(rng, 13)
    _run(kv, "a", a)
    monkeypatch.setattr(kv.pool, "verify", lambda *args: True)
    wrong = kv.get_computed_blocks("b", b)[0]
    assert wrong and wrong[0] == kv.get_block_table("a")[0]


def test_one_byte_hash_random_traffic_only_ever_hits_equal_content():
    rng = random.Random(8)
    bs = 2
    kv = KVCacheManager(200, bs, enable_prefix_caching=True, hash_fn=lambda d: hashlib.sha256(d).digest()[:1])
    content = {}
    live = []
    for i in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 12))]
        rid = f"r{i}"
        blocks, nc = kv.get_computed_blocks(rid, tokens)
        for j, b in enumerate(blocks):
            assert content[b] == tuple(tokens[:(j + 1) * bs]), "a collision handed out wrong KV"
        if kv.allocate_slots(rid, len(tokens) - nc, num_computed_tokens=nc, token_ids=tokens,
                             computed_blocks=blocks) is None:
            continue
        for j, b in enumerate(kv.get_block_table(rid)):
            if (j + 1) * bs <= len(tokens):
                content[b] = tuple(tokens[:(j + 1) * bs])  # the whole prefix a full block's KV depends on
        live.append(rid)
        if len(live) > 8:
            kv.free(live.pop(rng.randrange(len(live))))
    assert kv.stats.prefix_hits > 10 and kv.stats.miss_reasons[MissReason.HASH_COLLISION] > 0


def test_fork_shares_blocks_and_the_first_write_into_a_shared_partial_block_copies():
    rng = random.Random(9)
    bs = 4
    kv = KVCacheManager(32, bs)
    tokens = _prompt(rng, 10)  # blocks 0, 1 full, block 2 holds 2 tokens
    kv.allocate_slots("p", 10, token_ids=tokens)
    table = kv.get_block_table("p")
    kv.fork("p", "c")
    assert kv.get_block_table("c") == table and all(kv.pool.ref_counts[b] == 2 for b in table)
    free_before = kv.num_free_blocks
    assert kv.allocate_slots("c", 1, num_computed_tokens=10) == []
    child = kv.get_block_table("c")
    assert child[:2] == table[:2] and child[2] != table[2]
    assert kv.take_copies() == [(table[2], child[2])] and kv.take_copies() == []
    assert kv.take_replacements() == {"c": [(2, child[2])]}
    assert kv.num_free_blocks == free_before - 1
    assert kv.allocate_slots("p", 1, num_computed_tokens=10) == []  # now the sole holder: no copy
    assert kv.get_block_table("p") == table and kv.take_copies() == []
    kv.allocate_slots("p", 2, num_computed_tokens=11)  # crosses into a new block
    assert len(kv.get_block_table("p")) == 4
    kv.free("p")
    kv.free("c")
    assert kv.num_free_blocks == kv.num_usable_blocks
    kv.check_invariants()


def test_fork_at_a_block_boundary_needs_no_copy():
    kv = KVCacheManager(16, 4)
    kv.allocate_slots("p", 8)
    kv.fork("p", "c")
    new = kv.allocate_slots("c", 1, num_computed_tokens=8)
    assert len(new) == 1 and kv.take_copies() == []
    assert kv.get_block_table("c")[:2] == kv.get_block_table("p")


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(6, 4, enable_prefix_caching=True)  # 5 usable
    kv.allocate_slots("a", 9, token_ids=list(range(9)))
    kv.fork("a", "b")
    snap = (list(kv.pool.ref_counts), kv.num_free_blocks, kv.get_block_table("a"))
    assert kv.can_allocate("b", 8, num_computed_tokens=9) is False
    assert kv.allocate_slots("b", 8, num_computed_tokens=9) is None  # needs 1 CoW + 2 new, has 2
    assert kv.allocate_slots("z", 12) is None
    assert (list(kv.pool.ref_counts), kv.num_free_blocks, kv.get_block_table("a")) == snap
    assert kv.take_copies() == [] and "z" not in kv
    assert kv.can_allocate("b", 4, num_computed_tokens=9) is True


def test_misuse_raises_clear_errors_and_leaves_the_pool_consistent():
    kv = KVCacheManager(10, 4, enable_prefix_caching=True)
    kv.allocate_slots("a", 6, token_ids=list(range(6)))
    with pytest.raises(ValueError, match="needs 10 blocks for 40 tokens but the pool has only 9 usable"):
        kv.allocate_slots("a", 34, num_computed_tokens=6)
    kv.free("a")
    with pytest.raises(ValueError, match="'a' holds no blocks"):
        kv.free("a")
    with pytest.raises(ValueError, match="num_computed_tokens=6 must equal len\\(computed_blocks\\)"):
        kv.allocate_slots("a", 1, num_computed_tokens=6)  # appending to a finished request
    with pytest.raises(ValueError, match="num_new_tokens must be an int >= 0"):
        kv.allocate_slots("x", -1)
    with pytest.raises(ValueError, match="not a cached block"):
        kv.allocate_slots("x", 1, num_computed_tokens=4, computed_blocks=[3])
    with pytest.raises(ValueError, match="parent_id 'nope'"):
        kv.fork("nope", "y")
    with pytest.raises(ValueError, match="extra_keys must hold only"):
        kv.get_computed_blocks("x", list(range(9)), extra_keys=(object(),))
    with pytest.raises(ValueError, match="extra_keys must be a tuple"):
        kv.get_computed_blocks("x", list(range(9)), extra_keys="salt")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        KVCacheManager(10, 0)
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_usable_blocks and kv.num_requests == 0


def test_free_with_uncomputed_tokens_drops_their_registrations():
    rng = random.Random(10)
    kv = KVCacheManager(20, 4, enable_prefix_caching=True)
    tokens = _prompt(rng, 17)
    kv.allocate_slots("a", 17, token_ids=tokens)  # registers 4 full blocks for this step
    kv.free("a", num_computed_tokens=8)  # preempted before the step ran: only 2 blocks exist
    blocks, nc = kv.get_computed_blocks("b", tokens)
    assert nc == 8 and len(blocks) == 2
    kv.check_invariants()


def test_usage_and_counts():
    kv = KVCacheManager(11, 5, reserve_null_block=False)
    assert kv.usage == 0.0 and kv.num_usable_blocks == 11
    kv.allocate_slots("a", 23)
    assert kv.usage == pytest.approx(5 / 11) and kv.get_num_slots("a") == 25
    kv.allocate_slots("a", 10, num_computed_tokens=23)
    assert len(kv.get_block_table("a")) == 7


def test_forced_collision_across_cache_salts_is_rejected():
    rng = random.Random(11)
    kv = KVCacheManager(64, 4, enable_prefix_caching=True, hash_fn=_hash_ignoring_tokens)
    tokens = _prompt(rng, 9)
    _run(kv, "a", tokens, extra_keys=("salt-1",))
    assert kv.get_computed_blocks("b", tokens, extra_keys=("salt-2",)) == ([], 0)  # same hash, other salt
    assert kv.stats.miss_reasons[MissReason.HASH_COLLISION] == 1
    assert len(kv.get_computed_blocks("c", tokens, extra_keys=("salt-1",))[0]) == 2


def test_calling_only_when_a_new_block_is_needed_still_registers_filled_blocks():
    """The scheduler may skip allocate_slots while a request's tokens fit its last block."""
    rng = random.Random(12)
    bs = 4
    kv = KVCacheManager(32, bs, enable_prefix_caching=True)
    tokens = _prompt(rng, 6)
    kv.allocate_slots("a", 6, token_ids=tokens)
    tokens += _prompt(rng, 2)  # two decode steps inside block 1, no calls
    new = kv.allocate_slots("a", 1, num_computed_tokens=8, token_ids=tokens + [5])
    assert len(new) == 1 and kv.get_num_slots("a") == 12
    blocks, nc = kv.get_computed_blocks("b", tokens + [1])
    assert blocks == kv.get_block_table("a")[:2] and nc == 8
    with pytest.raises(ValueError, match="num_computed_tokens=13 exceeds the 12 token slots"):
        kv.allocate_slots("a", 1, num_computed_tokens=13)


def test_computed_blocks_reused_between_lookup_and_allocation_are_rejected():
    rng = random.Random(13)
    bs = 4
    kv = KVCacheManager(5, bs, enable_prefix_caching=True)  # 4 usable blocks
    tokens = _prompt(rng, 2 * bs + 1)
    _run(kv, "a", tokens)
    kv.free("a")
    blocks, nc = kv.get_computed_blocks("b", tokens)
    assert len(blocks) == 2
    other = _prompt(rng, 4 * bs)
    kv.allocate_slots("c", 4 * bs, token_ids=other)  # evicts and re-registers every block with other content
    kv.free("c")
    with pytest.raises(ValueError, match=r"computed_blocks\[0\] .* no longer holds this request's prefix"):
        kv.allocate_slots("b", len(tokens) - nc, num_computed_tokens=nc, token_ids=tokens, computed_blocks=blocks)
    with pytest.raises(ValueError, match="must cover the 8 tokens"):
        kv.allocate_slots("b", 1, num_computed_tokens=nc, computed_blocks=blocks)
    assert "b" not in kv
    kv.check_invariants()


def test_zero_new_tokens_never_copies():
    kv = KVCacheManager(16, 4)
    kv.allocate_slots("p", 6)
    kv.fork("p", "c")
    assert kv.can_allocate("c", 0, num_computed_tokens=6)
    assert kv.allocate_slots("c", 0, num_computed_tokens=6) == [] and kv.take_copies() == []
    assert kv.get_block_table("c") == kv.get_block_table("p")


def test_reset_prefix_cache_drops_only_free_cached_blocks():
    rng = random.Random(14)
    kv = KVCacheManager(32, 4, enable_prefix_caching=True)
    a, b = _prompt(rng, 13), _prompt(rng, 9)
    _run(kv, "a", a)
    _run(kv, "b", b)
    kv.free("a")
    assert kv.reset_prefix_cache() == 3  # a's three full blocks; b still holds its two
    assert kv.get_computed_blocks("x", a) == ([], 0)
    assert kv.stats.miss_reasons[MissReason.EVICTED] == 1
    assert len(kv.get_computed_blocks("y", b)[0]) == 2
    assert kv.num_free_blocks == kv.num_usable_blocks - len(kv.get_block_table("b"))
    kv.check_invariants()
