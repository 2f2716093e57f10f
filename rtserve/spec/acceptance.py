"""Acceptance tracking: how likely the next draft token of a request is to be accepted.

Two sources of evidence, mixed by weight: the request's own recent verify steps (an EWMA that also
fades with the steps since it was last verified, so a request that stopped speculating is tried
again once its old failures are forgotten), and a proposer-wide rate per *prior key*: proposals of
one key are alike. The n-gram proposer's key is the length of the matched suffix, and the two are
very different in practice (SmolLM2, greedy: a 4-token match on a copy task was accepted ~95% of the
time, a 2-token match in open chat ~10% per token), so a chat request does not inherit the rate that
copy requests earned.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Ewma:
    successes: float = 0.0
    trials: float = 0.0
    last_step: int = 0  # tracker step of the last observation


class AcceptanceTracker:
    """Per-token acceptance rate of one proposer, per request and per prior key. Also counts what
    the spec-decode metrics report (vLLM names: num_drafts, num_draft_tokens, num_accepted_tokens,
    ..._per_pos).

    A verify step with k drafts and a accepted is a successes and, if a < k, one failure (positions
    after the first rejection were never tested). `tick()` once per engine step ages the evidence.
    """

    def __init__(self, max_k: int, decay: float = 0.7, global_decay: float = 0.98, prior_rate: float = 0.5,
                 prior_weight: float = 2.0, half_life_steps: float = 64.0) -> None:
        if not 0.0 < decay < 1.0 or not 0.0 < global_decay < 1.0:
            raise ValueError("AcceptanceTracker decays must be in (0, 1)")
        if half_life_steps <= 0:
            raise ValueError("AcceptanceTracker half_life_steps must be positive")
        self.decay, self.global_decay, self.prior_weight = decay, global_decay, prior_weight
        self.prior_rate, self.half_life_steps = prior_rate, half_life_steps
        self._global: dict[int, _Ewma] = {}  # prior key -> proposer-wide EWMA
        self._per_request: dict[str, _Ewma] = {}
        self._step = 0
        self._best_key: int | None = None  # the key with the highest global rate (None: not found yet)
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * max_k

    def tick(self) -> None:
        self._step += 1
        self._best_key = None

    def global_rate(self, prior_key: int = 0) -> float:
        """Proposer-wide rate of proposals with this key (`prior_rate` until one was verified)."""
        g = self._global.get(prior_key)
        w = self.prior_weight
        return self.prior_rate if g is None else (g.successes + w * self.prior_rate) / (g.trials + w)

    def rate(self, request_id: str, prior_key: int = 0) -> float:
        """Estimated probability that the next draft token of this request, proposed with this key,
        is accepted: its own faded evidence plus `prior_weight` pseudo-trials at the key's rate."""
        own = self._per_request.get(request_id)
        w = self.prior_weight
        if own is None:
            return self.global_rate(prior_key)
        fade = 0.5 ** ((self._step - own.last_step) / self.half_life_steps)
        return (fade * own.successes + w * self.global_rate(prior_key)) / (fade * own.trials + w)

    def best_rate(self, request_id: str) -> float:
        """The highest rate any proposal could have for this request (its best-scoring key).

        A rate rises with its key's global rate, so the best key is the same for every request: it is
        found once per step (the chooser asks for every decoding request each step)."""
        if self._best_key is None:
            keys = [*(self._global or [0]), -1]
            self._best_key = max(keys, key=self.global_rate)
        return self.rate(request_id, self._best_key)

    def observe(self, request_id: str, num_draft: int, num_accepted: int, prior_key: int = 0) -> None:
        if num_draft <= 0:
            return
        trials = num_accepted + (1 if num_accepted < num_draft else 0)
        own = self._per_request.setdefault(request_id, _Ewma(last_step=self._step))
        fade = 0.5 ** ((self._step - own.last_step) / self.half_life_steps)
        own.successes = self.decay * fade * own.successes + num_accepted
        own.trials = self.decay * fade * own.trials + trials
        own.last_step = self._step
        self._best_key = None
        g = self._global.setdefault(prior_key, _Ewma())
        g.successes = self.global_decay * g.successes + num_accepted
        g.trials = self.global_decay * g.trials + trials
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        for pos in range(min(num_accepted, len(self.num_accepted_tokens_per_pos))):
            self.num_accepted_tokens_per_pos[pos] += 1

    def free(self, request_id: str) -> None:
        self._per_request.pop(request_id, None)

    @property
    def mean_accepted_len(self) -> float:
        """Mean tokens emitted per verify step with drafts (accepted + the target's own token)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
