import pytest

from rtserve.kv.block_pool import BlockPool
from rtserve.kv.hashing import extend_block_hashes, hash_block


def test_allocate_takes_lowest_ids_first_then_lru_order():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert [b.block_id for b in a] == [0, 1]
    pool.free([a[1], a[0]])  # tail first
    b = pool.allocate(3)
    assert [x.block_id for x in b] == [2, 3, 1]
    assert pool.num_free_blocks == 1


def test_allocate_beyond_capacity_raises():
    pool = BlockPool(2)
    pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_cached_block_is_revived_from_free_list_in_place():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    h0 = hash_block(None, (1, 2))
    h1 = hash_block(h0, (3, 4))
    pool.register(blocks[0], h0)
    pool.register(blocks[1], h1)
    pool.free([blocks[1], blocks[0]])
    assert pool.num_free_blocks == 3
    hit = pool.lookup(h0)
    assert hit is blocks[0]
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.num_free_blocks == 2
    # block 2 (never used) goes first, then block 1 (freed before block 0 was revived).
    assert [b.block_id for b in pool.allocate(2)] == [2, 1]
    assert pool.lookup(h1) is None  # evicted when reallocated


def test_lookup_verifies_tokens_and_parent():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    h = hash_block(None, (5, 6))
    pool.register(block, h)
    forged = type(h)(h.value, None, (7, 8))  # same hash value, other tokens: a collision
    assert pool.lookup(forged) is None
    assert pool.lookup(h) is block


def test_double_free_is_detected():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError):
        pool.free([block])


def test_chained_hashes_depend_on_prefix():
    a, b = [], []
    extend_block_hashes(a, [1, 2, 3, 4, 5], 2)
    extend_block_hashes(b, [9, 9, 3, 4], 2)
    assert len(a) == 2 and len(b) == 2
    assert a[1].token_ids == b[1].token_ids and a[1].value != b[1].value
    extend_block_hashes(a, [1, 2, 3, 4, 5, 6], 2)
    assert len(a) == 3 and a[2].parent_value == a[1].value
