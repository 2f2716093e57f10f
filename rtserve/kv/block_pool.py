"""The pool of KV blocks: reference counts, the LRU free list, and the prefix-cache index.

A block with ref_cnt == 0 sits in the free list. If it still carries a hash it stays in the cache
index and can be revived in O(1) by a prefix hit (removed from the free list wherever it is);
otherwise it is handed out by `allocate`, which takes the least recently freed block first and
evicts its hash then.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from rtserve.kv.hashing import BlockHash


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}  # hash value -> block

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        """Take n blocks from the LRU end of the free list (ref_cnt becomes 1). Caller checks capacity."""
        if n > len(self._free):
            raise RuntimeError(f"allocate({n}) with only {len(self._free)} free blocks")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        """A cached block with exactly this content and parent, or None."""
        block = self._cached.get(block_hash.value)
        if block is None or block.block_hash is None or not block.block_hash.matches(block_hash):
            return None
        return block

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cache hits, reviving blocks from the free list in O(1)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference each, in the given order (callers pass tail blocks first so they are
        evicted first: a prefix outlives its suffixes)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed twice")
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def register(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Make a full, computed block findable by `lookup`."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash.value in self._cached:
            return  # an identical block is already cached; keep the first
        block.block_hash = block_hash
        self._cached[block_hash.value] = block

    def count_evictable(self, blocks: list[KVBlock]) -> int:
        """How many of `blocks` currently sit in the free list (a hit on them consumes free capacity)."""
        return sum(1 for b in blocks if b.ref_cnt == 0)

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            self._cached.pop(block.block_hash.value, None)
            block.block_hash = None
