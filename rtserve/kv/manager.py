"""KVCacheManager: the only owner of block state.

The scheduler asks (`get_computed_blocks`, `can_allocate` is folded into `allocate_slots` returning
False), commits (`allocate_slots`), registers computed blocks for reuse (`cache_blocks`) and frees
(`free`). The runner only reads block ids.
"""
from __future__ import annotations

from rtserve.kv.block_pool import BlockPool, KVBlock
from rtserve.kv.hashing import extend_block_hashes


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_registered: dict[str, int] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up (cumulative)
        self.prefix_cache_hits = 0     # of which served from cache

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request) -> tuple[list[KVBlock], int]:
        """Longest verified cached prefix of the request's tokens, as (blocks, num_tokens).

        At least one token is always left to compute, because the step must produce logits.
        Does not take references: pass the blocks to `allocate_slots` to commit.
        """
        if not self.enable_caching:
            return [], 0
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request, num_new_tokens: int,
                       new_computed_blocks: list[KVBlock] | None = None) -> bool:
        """Reserve blocks so that `num_new_tokens` more tokens (after any cache hit) fit.

        Returns False, changing nothing, when there is not enough free capacity.
        """
        new_computed_blocks = new_computed_blocks or []
        if self.num_blocks_short(request, num_new_tokens, new_computed_blocks) > 0:
            return False
        if request.request_id not in self._blocks:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(new_computed_blocks) * self.block_size
        needed = self._num_new_blocks(request, num_new_tokens, new_computed_blocks)
        self.pool.touch(new_computed_blocks)
        held = self._blocks.setdefault(request.request_id, [])
        held.extend(new_computed_blocks)
        held.extend(self.pool.allocate(needed))
        self._num_registered.setdefault(request.request_id, len(new_computed_blocks))
        return True

    def num_blocks_short(self, request, num_new_tokens: int,
                         new_computed_blocks: list[KVBlock] | None = None) -> int:
        """Free blocks missing for `allocate_slots(request, num_new_tokens, new_computed_blocks)`; 0: it fits."""
        new_computed_blocks = new_computed_blocks or []
        needed = self._num_new_blocks(request, num_new_tokens, new_computed_blocks)
        needed += self.pool.count_evictable(new_computed_blocks)  # a hit on a free block consumes it
        return max(needed - self.pool.num_free_blocks, 0)

    def num_reclaimable_blocks(self, request) -> int:
        """Blocks that would return to the free list if `request` were freed (those no one else holds)."""
        return sum(1 for b in self._blocks.get(request.request_id, ()) if b.ref_cnt == 1)

    def _num_new_blocks(self, request, num_new_tokens: int, new_computed_blocks: list[KVBlock]) -> int:
        held = self._blocks.get(request.request_id, ())
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        needed = self.num_blocks_needed(num_computed + num_new_tokens) - len(held) - len(new_computed_blocks)
        return max(needed, 0)

    def cache_blocks(self, request) -> None:
        """Register the request's full blocks whose tokens are now computed."""
        if not self.enable_caching:
            return
        held = self._blocks.get(request.request_id)
        if not held:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(held))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        for i in range(start, num_full):
            self.pool.register(held[i], request.block_hashes[i])
        self._num_registered[request.request_id] = num_full

    def free(self, request) -> None:
        """Release all of the request's blocks (tail first, so prefixes are evicted last)."""
        held = self._blocks.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        if held:
            self.pool.free(list(reversed(held)))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
