"""BlockPool: FIFO free list, ref counts, content hashes, integrity checks."""

import random

import pytest

from engine.core.block_pool import BlockPool, NoFreeBlocks


def test_allocate_takes_longest_free_first_and_frees_to_the_back():
    pool = BlockPool("c4", 4)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.decref(1) is True
    # 3 has been free since the start, 1 only just: 3 is reused first.
    assert pool.allocate() == 3
    assert pool.allocate() == 1
    assert pool.num_free == 0 and pool.num_used == 4
    pool.check_integrity()


def test_exhausted_pool_raises_no_free_blocks():
    pool = BlockPool("window", 1)
    pool.allocate()
    with pytest.raises(NoFreeBlocks, match="window"):
        pool.allocate()
    empty = BlockPool("c128", 0)
    assert empty.usage == 0.0
    with pytest.raises(NoFreeBlocks):
        empty.allocate()


def test_ref_counts_free_only_at_zero():
    pool = BlockPool("state", 2)
    block = pool.allocate()
    pool.incref(block)
    pool.incref(block)
    assert pool.ref_count(block) == 3
    assert pool.decref(block) is False
    assert pool.decref(block) is False
    assert pool.num_used == 1
    assert pool.decref(block) is True
    assert pool.num_used == 0 and pool.ref_count(block) == 0
    pool.check_integrity()


def test_usage_fraction():
    pool = BlockPool("c4", 8)
    for _ in range(6):
        pool.allocate()
    assert pool.usage == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_num_blocks_is_a_value_error(bad):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool("c4", bad)


def test_misuse_of_free_or_unknown_blocks_is_a_value_error():
    pool = BlockPool("c4", 2)
    with pytest.raises(ValueError, match="decref of free block"):
        pool.decref(0)
    with pytest.raises(ValueError, match="incref of free block"):
        pool.incref(0)
    with pytest.raises(ValueError, match="block_id"):
        pool.incref(5)
    with pytest.raises(ValueError, match="block_id"):
        pool.ref_count(-1)
    with pytest.raises(ValueError, match="cannot register free block"):
        pool.register(b"k", 1)


def test_hash_registration_first_wins_and_is_dropped_on_free():
    pool = BlockPool("c4", 3)
    a, b = pool.allocate(), pool.allocate()
    assert pool.register(b"prefix", a) == a
    # The same content computed again elsewhere: the earlier block stays the named copy.
    assert pool.register(b"prefix", b) == a
    assert pool.cached_block(b"prefix") == a
    pool.incref(a)
    pool.decref(a)
    assert pool.cached_block(b"prefix") == a  # still held by someone
    pool.decref(a)
    assert pool.cached_block(b"prefix") is None
    # Once free, b can take the name.
    assert pool.register(b"prefix", b) == b
    pool.check_integrity()


def test_integrity_check_catches_corruption():
    pool = BlockPool("c4", 3)
    pool.allocate()
    pool._free.append(2)  # a block listed twice
    with pytest.raises(AssertionError, match="twice"):
        pool.check_integrity()

    pool = BlockPool("c4", 3)
    block = pool.allocate()
    pool._ref_counts[block] = 0  # used but claims no holders
    with pytest.raises(AssertionError, match="ref count 0"):
        pool.check_integrity()


def test_random_operations_match_a_shadow_model():
    rng = random.Random(7)
    pool = BlockPool("c4", 16)
    holders: dict[int, int] = {}
    for _ in range(2000):
        op = rng.random()
        if op < 0.4 and pool.num_free:
            block = pool.allocate()
            assert block not in holders
            holders[block] = 1
        elif op < 0.6 and holders:
            block = rng.choice(sorted(holders))
            pool.incref(block)
            holders[block] += 1
        elif holders:
            block = rng.choice(sorted(holders))
            holders[block] -= 1
            freed = pool.decref(block)
            assert freed == (holders[block] == 0)
            if freed:
                del holders[block]
        assert pool.num_used == len(holders)
        assert all(pool.ref_count(b) == n for b, n in holders.items())
        pool.check_integrity()
