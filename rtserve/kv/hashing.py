"""Chained block hashes for automatic prefix caching.

A full block's hash covers its own token ids and its parent's hash, so equal hashes imply equal
prefixes (up to collisions). Each `BlockHash` also keeps the token ids and parent value, so a hit is
verified exactly before it is used (`matches`), making a hash collision a miss, never wrong output.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockHash:
    value: int
    parent_value: int | None
    token_ids: tuple[int, ...]

    def matches(self, other: "BlockHash") -> bool:
        return self.parent_value == other.parent_value and self.token_ids == other.token_ids


def hash_block(parent: BlockHash | None, token_ids: tuple[int, ...]) -> BlockHash:
    parent_value = None if parent is None else parent.value
    return BlockHash(hash((parent_value, token_ids)), parent_value, token_ids)


def extend_block_hashes(hashes: list[BlockHash], token_ids: list[int], block_size: int) -> None:
    """Append hashes for every newly completed full block of `token_ids` (modifies `hashes`)."""
    num_full = len(token_ids) // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
