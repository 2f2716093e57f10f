"""Stop-string matching over streamed text deltas.

Invariants:
- A match is found wherever it starts, even if it spans many deltas: emitted text never contains
  any part of it, because we always hold back the longest suffix that is a proper prefix of some
  stop string (vllm#3574).
- Among several stop strings the one that completes first (earliest end) wins; on a tie the longer
  one wins. This is what a character-by-character check would do, so the result does not depend on
  how the text was split into deltas.
- Held-back text is released by `flush()` when the request ends for any other reason
  (koboldcpp PR #1031: text held as a possible stop prefix must not be lost on EOS).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopResult:
    text: str  # safe to emit now
    stopped: bool = False
    matched: str | None = None  # the stop string that matched, when stopped


class StopStringMatcher:
    """Per-request matcher; feed it detokenized deltas in order."""

    def __init__(self, stop: list[str], include_stop_str_in_output: bool) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = list(dict.fromkeys(stop))  # dedup, keep order
        self._include = include_stop_str_in_output
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._held = ""
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self._matched is not None

    def feed(self, text: str) -> StopResult:
        """Add a delta; return what can be emitted. After a match, further input is ignored."""
        if self._matched is not None:
            return StopResult("", True, self._matched)
        if not self._stop:
            return StopResult(text)
        buf = self._held + text
        match = self._first_match(buf)
        if match is not None:
            start, stop_str = match
            self._held = ""
            self._matched = stop_str
            end = start + len(stop_str) if self._include else start
            return StopResult(buf[:end], True, stop_str)
        hold = self._partial_len(buf)
        self._held = buf[len(buf) - hold:]
        return StopResult(buf[:len(buf) - hold])

    def flush(self) -> str:
        """Release held-back text (the request ended without this matcher stopping it)."""
        held, self._held = self._held, ""
        return "" if self._matched is not None else held

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        # Earliest end, then longest (= earliest start). Held text has no full match, so any match
        # here ends in the new delta.
        best: tuple[int, int, str] | None = None
        for s in self._stop:
            start = buf.find(s)
            if start < 0:
                continue
            key = (start + len(s), -len(s), s)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else (best[0] + best[1], best[2])

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        for n in range(min(len(buf), self._max_hold), 0, -1):
            suffix = buf[len(buf) - n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0
