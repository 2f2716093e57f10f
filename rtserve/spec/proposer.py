"""Draft-token proposers behind one interface: n-gram prompt lookup here, a draft model in draft_model.py.

A proposer looks at each request's tokens (prompt + output so far) and proposes up to k tokens that
the target model then verifies in one forward (rtserve/sample/rejection.py). Proposers never touch
the target's KV cache or the scheduler's state; the engine decides k per request (spec/adaptive.py)
and tells a proposer when a request is gone (`free`).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from rtserve.sampling_params import SamplingParams


class SpecRequest(Protocol):
    """What a proposer reads from an engine request (rtserve.engine.request.Request has these)."""

    request_id: str
    all_token_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator | None


@dataclass
class Proposal:
    """Up to k proposed tokens for one request and the distribution they were drawn from.

    `probs` [len(token_ids), V] f32 is the draft distribution q of each token; None means the proposer
    is deterministic (q is one-hot at the proposed token), which rejection sampling handles exactly.
    `prior_key` groups proposals whose acceptance is alike (n-gram: the matched suffix length); the
    acceptance tracker keeps one proposer-wide rate per key (spec/acceptance.py).
    """

    token_ids: list[int]
    probs: torch.Tensor | None = None
    prior_key: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Proposer(abc.ABC):
    """Proposes draft tokens; implementations: NgramProposer, DraftModelProposer."""

    name: str = "proposer"
    is_cheap: bool = True  # proposing costs ~nothing: propose first, then choose k within what was found

    @abc.abstractmethod
    def propose(self, requests: Sequence[SpecRequest], num_tokens: Sequence[int]) -> list[Proposal]:
        """At most `num_tokens[i]` tokens to follow `requests[i].all_token_ids` (fewer or none is fine)."""

    def free(self, request_id: str) -> None:
        """Forget per-request state (the request finished or was aborted). Default: none kept."""

    def cost_s(self, num_rounds: int, num_tokens: int) -> float:
        """Predicted seconds to propose `num_tokens` in total, `num_rounds` deep. Default: negligible."""
        return 0.0


class NgramProposer(Proposer):
    """Prompt lookup: match the last n tokens (n from max_n down to min_n) against earlier context and
    propose what followed the most recent match. No model, q one-hot. The only per-request state is
    a copy of its tokens as an array, extended by the tokens appended since the last step (converting
    the whole list each step cost as much as the match itself).

    The continuation may run into the suffix itself; it then repeats with the period of the match
    (after "a b c a b" with match "a b" at 0, the proposal is "c a b c ..."), which is exactly what a
    repetitive sequence would produce.
    """

    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4, max_lookback: int = 4096) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n, self.max_lookback = min_n, max_n, max_lookback
        self._arrays: dict[str, tuple[np.ndarray, int]] = {}  # request id -> (buffer, tokens in it)

    def propose(self, requests: Sequence[SpecRequest], num_tokens: Sequence[int]) -> list[Proposal]:
        proposals = []
        for r, k in zip(requests, num_tokens):
            if k <= 0:
                proposals.append(Proposal([]))
                continue
            token_ids, match_len = ngram_match(self._tokens(r)[-self.max_lookback:], self.min_n, self.max_n, k)
            proposals.append(Proposal(token_ids, prior_key=match_len))
        return proposals

    def _tokens(self, r: SpecRequest) -> np.ndarray:
        """r's tokens as an array: the cached one extended by what was appended since (tokens are only
        ever appended; a request whose tokens do not continue the copy is copied afresh)."""
        ids, n = r.all_token_ids, len(r.all_token_ids)
        buf, have = self._arrays.get(r.request_id, (None, 0))
        if buf is None or have > n or (have and buf[have - 1] != ids[have - 1]):
            buf, have = np.empty(max(2 * n, 64), dtype=np.int64), 0
        if n > len(buf):
            buf = np.resize(buf, 2 * n)
        if n > have:
            buf[have:n] = ids[have:n]
        self._arrays[r.request_id] = (buf, n)
        return buf[:n]

    def free(self, request_id: str) -> None:
        self._arrays.pop(request_id, None)


def ngram_lookup(token_ids: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens continuing `token_ids` after its longest suffix (max_n..min_n) seen before."""
    return ngram_match(token_ids, min_n, max_n, k)[0]


def ngram_match(token_ids: Sequence[int], min_n: int, max_n: int, k: int) -> tuple[list[int], int]:
    """(up to k tokens continuing `token_ids` after its longest suffix seen before, that suffix's
    length in min_n..max_n); ([], 0) when no suffix of min_n tokens occurred before.

    Candidates are earlier occurrences of the last token; each is extended backwards while it keeps
    matching the suffix (up to max_n). The longest match wins, the most recent among equals.
    """
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    if length < min_n + 1:
        return [], 0
    # Every candidate ends before the suffix does, so at least one real token follows it.
    ends = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])  # [C]
    match_len = np.ones(ends.size, dtype=np.int64)  # [C]
    still = np.ones(ends.size, dtype=bool)  # [C] matched every position so far
    for back in range(1, min(max_n, length - 1)):
        pos = ends - back
        still &= pos >= 0
        still[still] = tokens[pos[still]] == tokens[length - 1 - back]
        match_len += still
    good = np.flatnonzero(match_len >= min_n)
    if good.size == 0:
        return [], 0
    best_len = int(match_len[good].max())
    longest = good[match_len[good] == best_len]
    start = int(ends[longest[-1]]) + 1  # first token after the most recent longest match (< length)
    period = length - start
    return tokens[start + np.arange(k) % period].tolist(), best_len
