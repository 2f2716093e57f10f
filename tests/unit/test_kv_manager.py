from rtserve.engine.request import Request
from rtserve.kv.manager import KVCacheManager
from rtserve.sampling_params import SamplingParams


def req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4), 0.0)


def test_allocate_exact_block_ids_and_free():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = req("a", range(10))
    hits, n = kv.get_computed_blocks(r)
    assert (hits, n) == ([], 0)
    assert kv.allocate_slots(r, 10, hits)
    assert kv.block_ids("a") == [0, 1, 2]
    r.num_computed_tokens = 10
    kv.cache_blocks(r)
    assert kv.allocate_slots(r, 3)  # 13 tokens -> 4 blocks
    assert kv.block_ids("a") == [0, 1, 2, 3]
    kv.free(r)
    assert kv.num_free_blocks == 8 and kv.block_ids("a") == []


def test_prefix_hit_reuses_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", range(12))
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    kv.cache_blocks(a)
    kv.free(a)
    # Same 12 tokens: only 2 blocks may hit, the last token (in block 3) must be recomputed.
    b = req("b", range(12))
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    assert kv.allocate_slots(b, 4, hits)
    assert kv.block_ids("b")[:2] == [0, 1]
    # A longer prompt sharing 12 tokens hits all three blocks.
    c = req("c", list(range(12)) + [99, 98])
    hits, n = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0, 1, 2] and n == 12
    assert kv.prefix_cache_queries == 12 + 12 and kv.prefix_cache_hits == 8


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = req("a", range(12))
    assert not kv.allocate_slots(r, 12)
    assert kv.num_free_blocks == 2 and kv.block_ids("a") == []


def test_hit_on_free_cached_blocks_counts_against_capacity():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = req("a", range(8))
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_blocks(a)
    kv.free(a)
    b = req("b", list(range(8)) + list(range(100, 108)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    # needs 2 new blocks + revives 2 free cached ones = 4 > 3 free.
    assert not kv.allocate_slots(b, 8, hits)
    assert kv.num_free_blocks == 3
    assert kv.num_blocks_short(b, 8, hits) == 1


def test_blocks_short_and_reclaimable_blocks_answer_before_anything_is_committed():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = req("a", range(8)), req("b", list(range(8)) + [50, 51])
    assert kv.num_blocks_short(a, 8) == 0 and kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_blocks(a)
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and kv.allocate_slots(b, 2, hits)  # shares a's two blocks, adds one
    assert kv.num_reclaimable_blocks(a) == 0  # both of its blocks are b's prefix too
    assert kv.num_reclaimable_blocks(b) == 1
    c = req("c", range(100, 112))
    assert kv.num_blocks_short(c, 12) == 2 and kv.num_free_blocks == 1
    kv.free(b)
    assert kv.num_blocks_short(c, 12) == 1
