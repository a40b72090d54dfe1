"""Unit tests of the block pool and its free queue (no manager)."""

import random

import pytest

from blocks.cache.block_pool import BlockPool, FreeBlockQueue


def test_free_queue_matches_a_list_model_under_random_operations():
    rng = random.Random(3)
    ids = list(range(37))
    q, model = FreeBlockQueue(ids), list(ids)
    outside: list[int] = []
    for _ in range(2000):
        op = rng.randrange(4)
        if op == 0 and model:
            n = rng.randint(0, min(5, len(model)))
            got = q.popleft_n(n)
            assert got == model[:n]
            del model[:n]
            outside += got
        elif op == 1 and outside:
            b = outside.pop(rng.randrange(len(outside)))
            q.append(b)
            model.append(b)
        elif op == 2 and outside:
            b = outside.pop(rng.randrange(len(outside)))
            q.appendleft(b)
            model.insert(0, b)
        elif op == 3 and model:
            b = model.pop(rng.randrange(len(model)))
            q.remove(b)
            outside.append(b)
        assert list(q) == model and len(q) == len(model)


@pytest.mark.parametrize("null", [True, False])
def test_allocate_hands_out_distinct_blocks_and_never_the_null_block(null):
    pool = BlockPool(23, reserve_null_block=null)
    got = pool.allocate(pool.num_usable_blocks)
    assert len(set(got)) == len(got) == 23 - null
    assert (0 in got) != null
    assert all(pool.ref_counts[b] == 1 for b in got)
    assert pool.num_free == 0
    with pytest.raises(ValueError, match="cannot allocate 1 blocks: 0 free"):
        pool.allocate(1)
    pool.free(got)
    pool.check_invariants()
    assert pool.num_free == pool.num_usable_blocks


def test_touch_takes_a_free_block_out_of_the_middle_of_the_queue():
    pool = BlockPool(11)
    ids = pool.allocate(6)
    pool.free(ids)
    middle = ids[3]
    pool.touch([middle])
    assert middle not in pool.free_queue and pool.ref_counts[middle] == 1
    assert len(pool.free_queue) == 9
    pool.touch([middle])  # a second holder: count only
    assert pool.ref_counts[middle] == 2
    pool.check_invariants()


def test_double_free_raises_and_rolls_back_the_partial_free():
    pool = BlockPool(17)
    a = pool.allocate(4)
    b = pool.allocate(3)
    pool.free(b)
    free_before, refs_before = list(pool.free_queue), list(pool.ref_counts)
    with pytest.raises(ValueError, match=rf"cannot free block {b[1]}: already free"):
        pool.free([a[0], a[1], b[1]])
    assert list(pool.free_queue) == free_before and pool.ref_counts == refs_before
    with pytest.raises(ValueError, match="null block"):
        pool.free([0])
    pool.check_invariants()


def test_uncached_blocks_are_reused_before_cached_ones():
    pool = BlockPool(9)
    ids = pool.allocate(8)
    pool.cache_block(ids[2], b"h2", (1, 2), 0, ())
    pool.cache_block(ids[5], b"h5", (3, 4), 0, ())
    pool.free(ids)
    order = list(pool.free_queue)
    assert set(order[-2:]) == {ids[2], ids[5]}, "cached blocks must sit at the eviction end"
    reused = pool.allocate(6)
    assert pool.lookup(b"h2") == ids[2] and pool.lookup(b"h5") == ids[5]
    assert pool.stats.evictions == 0
    pool.allocate(1)
    assert pool.stats.evictions == 1 and pool.num_cached_blocks == 1
    assert not set(reused) & {ids[2], ids[5]}


@pytest.mark.parametrize("bad", [-1, 0, 1.5, "8"])
def test_pool_rejects_bad_num_blocks(bad):
    with pytest.raises(ValueError, match="num_blocks must be an int >= 2"):
        BlockPool(bad)


def test_cache_block_requires_a_held_uncached_block():
    pool = BlockPool(5)
    (b,) = pool.allocate(1)
    pool.cache_block(b, b"x", (1,), 0, ())
    with pytest.raises(ValueError, match="already cached"):
        pool.cache_block(b, b"y", (1,), 0, ())
    (c,) = pool.allocate(1)
    with pytest.raises(ValueError, match="already cached by another block"):
        pool.cache_block(c, b"x", (1,), 0, ())
    pool.free([c])
    with pytest.raises(ValueError, match="must be held"):
        pool.cache_block(c, b"z", (1,), 0, ())


@pytest.mark.parametrize("bad,message", [
    (-1, r"ints in \[0, num_blocks=13\), got \[-1\]"),
    (13, r"got \[13\]"),
    (2.0, "must be ints, got 2.0"),
])
def test_free_and_touch_reject_bad_ids_without_changing_the_pool(bad, message):
    pool = BlockPool(13)
    held = pool.allocate(5)
    refs, order = list(pool.ref_counts), list(pool.free_queue)
    with pytest.raises(ValueError, match=message):
        pool.free([held[0], held[1], bad])
    with pytest.raises(ValueError, match="block ids must be ints"):
        pool.touch([held[2], bad])
    with pytest.raises(ValueError, match="null block"):
        pool.touch([0])
    assert pool.ref_counts == refs and list(pool.free_queue) == order
    pool.check_invariants()
