"""Incremental detokenization that never emits a broken UTF-8 character.

Technique (vLLM `detokenize_incrementally`, TGI `decode_token`): keep two offsets into the ids,
`prefix_offset <= read_offset`. Each step decode the window `ids[prefix:read]` (already emitted)
and `ids[prefix:]`, and emit only the extension. Decoding from a few tokens back keeps the context
that word-boundary decoders need (e.g. a leading-space marker on the first token of a window).
While the decoded window ends with U+FFFD the last tokens may be an incomplete multi-byte
character (byte-level BPE or byte-fallback), so the text is held back until a later token
completes it or `flush()` is called. Offsets only move forward, so nothing is emitted twice.
"""
from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# How many prompt tokens the first window reaches back (vLLM uses 5).
_INITIAL_WINDOW_TOKENS = 5


class DecodingTokenizer(Protocol):
    special_token_ids: frozenset[int]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas; O(1) amortized work per token."""

    def __init__(self, tokenizer: DecodingTokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only the window is kept: `_ids` starts at prefix_offset, so offsets are relative to it.
        tail = self._filter(prompt_token_ids[-_INITIAL_WINDOW_TOKENS:])
        self._ids: list[int] = tail
        self._read_offset = len(tail)  # ids[:read_offset] are context that is never emitted
        self._prefix_text = self._decode(tail)

    def add(self, new_token_ids: list[int]) -> str:
        """Append generated ids; return the text that became stable (may be "")."""
        new_ids = self._filter(new_token_ids)
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        new_text = self._decode(self._ids)
        if not new_text.endswith(REPLACEMENT_CHAR):
            return self._advance(new_text)
        if len(new_ids) == 1:
            return ""  # maybe an incomplete character: wait for the next token or flush()
        # Several ids (speculative decoding) ending mid-character: release the complete part.
        del self._ids[len(self._ids) - len(new_ids):]
        return "".join([self.add([token_id]) for token_id in new_ids])

    def flush(self) -> str:
        """Emit whatever is still held back (incomplete characters become U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        return self._advance(self._decode(self._ids))

    def _advance(self, new_text: str) -> str:
        # `new_text` decodes the whole window; the part past the emitted prefix is new.
        delta = new_text[_common_prefix_len(self._prefix_text, new_text):]
        # The next window starts where this step's unread ids began.
        del self._ids[:self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _filter(self, ids: list[int]) -> list[int]:
        # Skipped special tokens decode to nothing; dropping them early keeps windows short.
        if not self._skip_special_tokens:
            return list(ids)
        specials = self._tokenizer.special_token_ids
        return [t for t in ids if t not in specials]


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix; the common case `b.startswith(a)` is one C call."""
    if b.startswith(a):
        return len(a)
    # Differs only when the emitted prefix ended in U+FFFD (a prompt cut mid-character) or a
    # decoder rewrote earlier text; emit from the first differing character, never re-emit.
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
