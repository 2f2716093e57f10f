"""Adaptive speculation length: measured acceptance in, k per request out (0 included).

With per-token acceptance rate a, the j-th draft token of a request is used only if all j before it
were, so it adds a^j expected tokens; k drafts give E = 1 + a + ... + a^k tokens per verify step
(Leviathan et al.). A verify token costs what a prefill token costs. Each step the chooser takes the
draft tokens with the largest expected gain first and keeps the prefix that maximises

    goodput = expected emitted tokens / (predicted target step time + predicted draft time)

(SmartSpec, arXiv 2406.14066). k = 0 for everyone is always a candidate, so by the cost model's own
prediction speculation never makes a step less productive: in a large, compute-bound batch the extra
tokens cost more than they return and k drops to 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass
class _Ewma:
    successes: float = 0.0
    trials: float = 0.0


class AcceptanceTracker:
    """Per-token acceptance rate of one proposer: an EWMA per request, and one over all its requests
    that serves as the prior for requests with little history. Also counts what the spec-decode
    metrics report (vLLM names: num_drafts, num_draft_tokens, num_accepted_tokens, ..._per_pos).

    A verify step with k drafts and a accepted is a successes and, if a < k, one failure (positions
    after the first rejection were never tested).
    """

    def __init__(self, max_k: int, decay: float = 0.7, global_decay: float = 0.98, prior_rate: float = 0.5,
                 prior_weight: float = 2.0) -> None:
        if not 0.0 < decay < 1.0 or not 0.0 < global_decay < 1.0:
            raise ValueError("AcceptanceTracker decays must be in (0, 1)")
        self.decay, self.global_decay, self.prior_weight = decay, global_decay, prior_weight
        self._global = _Ewma(prior_rate * prior_weight, prior_weight)
        self._per_request: dict[str, _Ewma] = {}
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * max_k

    @property
    def global_rate(self) -> float:
        return self._global.successes / self._global.trials

    def rate(self, request_id: str) -> float:
        """Estimated probability that the next draft token of this request is accepted."""
        own = self._per_request.get(request_id, _Ewma())
        w = self.prior_weight
        return (own.successes + w * self.global_rate) / (own.trials + w)

    def observe(self, request_id: str, num_draft: int, num_accepted: int) -> None:
        if num_draft <= 0:
            return
        trials = num_accepted + (1 if num_accepted < num_draft else 0)
        for ewma, decay in ((self._per_request.setdefault(request_id, _Ewma()), self.decay),
                            (self._global, self.global_decay)):
            ewma.successes = decay * ewma.successes + num_accepted
            ewma.trials = decay * ewma.trials + trials
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


class StepTimeTable:
    """Measured step time by the number of tokens in the step (an EWMA per token count).

    CPU kernels make step time far from linear in tokens (an int4 GEMV per row below some M, a bf16
    GEMM above it), so the k chooser trusts what steps of the same size actually took, interpolates
    between measured sizes, and falls back to a cost model only where nothing was measured. Entries
    older than `max_age_steps` are ignored, so a size that looked slow once is tried again later.
    """

    def __init__(self, decay: float = 0.7, max_age_steps: int = 500) -> None:
        self.decay, self.max_age_steps = decay, max_age_steps
        self._step = 0
        self._table: dict[int, tuple[float, int]] = {}  # num_tokens -> (EWMA seconds, step last seen)

    def observe(self, num_tokens: int, step_s: float) -> None:
        self._step += 1
        old = self._table.get(num_tokens)
        value = step_s if old is None or self._is_stale(old) else self.decay * old[0] + (1 - self.decay) * step_s
        self._table[num_tokens] = (value, self._step)

    def predict(self, num_tokens: int, fallback: Callable[[int], float]) -> float:
        """Seconds for a step of `num_tokens`; `fallback(n)` (a cost model) fills unmeasured ranges."""
        fresh = {n: v for n, (v, _) in self._table.items() if not self._is_stale((v, _))}
        if num_tokens in fresh:
            return fresh[num_tokens]
        below = max((n for n in fresh if n < num_tokens), default=None)
        above = min((n for n in fresh if n > num_tokens), default=None)
        if below is not None and above is not None:
            w = (num_tokens - below) / (above - below)
            return (1 - w) * fresh[below] + w * fresh[above]
        anchor = below if below is not None else above
        if anchor is None:
            return fallback(num_tokens)
        # Measured level at the nearest size, the cost model's slope from there (never below it).
        return max(fresh[anchor] + fallback(num_tokens) - fallback(anchor), 0.0)

    def _is_stale(self, entry: tuple[float, int]) -> bool:
        return self._step - entry[1] > self.max_age_steps


@dataclass
class SpecLengthChooser:
    """Chooses how many draft tokens each request verifies this step.

    `min_rel_gain`: speculate only if predicted goodput beats k = 0 by this fraction (the cost
    model is noisy; a marginal predicted win is not worth the variance it adds to the step time).
    """

    max_k: int
    min_rel_gain: float = 0.05
    _last_goodput: tuple[float, float] = field(default=(0.0, 0.0), repr=False)  # (k=0, chosen), per second

    def choose(self, rates: Sequence[float], max_ks: Sequence[int], step_time_s: Callable[[int], float],
               draft_time_s: Callable[[int, int], float] = lambda num_rounds, num_tokens: 0.0) -> list[int]:
        """k per request. rates[i]: acceptance rate; max_ks[i]: tokens available (proposal length, or
        max_k before proposing); step_time_s(n): predicted target step time with n verify tokens on
        top of this step's decodes and prefill; draft_time_s(rounds, tokens): predicted proposing time.
        """
        # Largest gain first; ties (rate 1) in position order, so each request's drafts stay a prefix.
        gains = sorted(((rate ** j, i, j) for i, rate in enumerate(rates)
                        for j in range(1, min(max_ks[i], self.max_k) + 1) if rate > 0.0),
                       key=lambda g: (-g[0], g[1], g[2]))
        base = len(rates) / max(step_time_s(0), 1e-9)
        best_m, best, tokens, depth = 0, base, float(len(rates)), [0] * len(rates)
        for m, (gain, i, j) in enumerate(gains, start=1):
            tokens += gain
            depth[i] = max(depth[i], j)
            goodput = tokens / max(step_time_s(m) + draft_time_s(max(depth), m), 1e-9)
            if goodput > best:
                best_m, best = m, goodput
        if best < base * (1.0 + self.min_rel_gain):
            best_m, best = 0, base
        self._last_goodput = (base, best)
        ks = [0] * len(rates)
        for _, i, j in gains[:best_m]:
            ks[i] = max(ks[i], j)
        return ks

    @property
    def predicted_speedup(self) -> float:
        """Predicted goodput of the last choice relative to no speculation (1.0: none chosen)."""
        base, chosen = self._last_goodput
        return chosen / base if base > 0 else 1.0
