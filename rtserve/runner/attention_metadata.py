"""Per-step attention inputs, built by the runner and passed explicitly to every layer (no globals).

Tokens of a step are flattened into one dimension T. Sequences are laid out decodes first
(one query token each), then prefill chunks (one or more query tokens each):

    [ d_0 | d_1 | ... | d_{D-1} | p_0 tokens ... | p_1 tokens ... ]

The KV cache of a layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]; flattening
blocks gives slots [num_blocks * block_size, num_kv_heads, head_dim], and slot = block_id * block_size
+ offset. `slot_mapping[t]` is where token t's K/V is written; `*_gather_idx` lists, for each context
position of a sequence, the slot to read; decodes read whole blocks through a block table.
A sliding-window layer reads `windowed[window]` instead: the gathers and block tables start at the
first position its queries can see, and the masks also cut keys older than the window.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    """One sequence computing query_len > 0 tokens on top of (context_len - query_len) cached ones."""

    query_start: int          # index of its first token in the flattened T dimension
    query_len: int
    context_len: int          # tokens visible to the last query token (cached + this chunk)
    gather_idx: torch.Tensor  # [context_len] int64 slots
    causal_mask: torch.Tensor | None  # [query_len, context_len] bool (True = attend); None = plain causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor           # [T] int64
    num_decodes: int = 0                 # D: the first D tokens are single-token decodes
    # Decodes read whole blocks: row i lists sequence i's blocks (padding: block 0), and the mask
    # covers num_blocks_max * block_size context slots per row (True = attend).
    decode_block_table: torch.Tensor | None = None  # [D, num_blocks_max] int64
    decode_mask: torch.Tensor | None = None         # [D, 1, 1, num_blocks_max * block_size] bool
    decode_seq_lens: torch.Tensor | None = None     # [D] int64 context lengths (new token included)
    block_size: int = 1
    # When D == 1 and that sequence's slots are consecutive: [start, end) of them (attention slices
    # the cache instead of gathering it). None otherwise.
    decode_slot_range: tuple[int, int] | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Sliding-window layers read the metadata built for their window (same slot_mapping, each query
    # seeing only its last `window` positions): window -> metadata, from `prepare_inputs`.
    windowed: dict[int, "AttentionMetadata"] = field(default_factory=dict)

    def for_window(self, window: int) -> "AttentionMetadata":
        """The metadata for a layer attending to its last `window` positions (0: the whole context)."""
        if not window:
            return self
        if window not in self.windowed:
            raise ValueError(f"no attention metadata was built for a sliding window of {window}")
        return self.windowed[window]
