"""Speculator: the engine's one handle on speculative decoding (proposer + acceptance + k chooser).

Before each schedule the engine asks for proposals for the decoding requests; the scheduler then
counts 1 + k tokens for each (the last token plus k drafts) and the runner verifies them. After the
step the engine reports what was accepted (acceptance estimates, metrics) and how long the step took
(the measured step-time table the k chooser prefers over the linear cost model).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from rtserve.spec.acceptance import AcceptanceTracker
from rtserve.spec.adaptive import DraftCostCorrection, SpecLengthChooser, SpeedupCalibration, StepTimeTable
from rtserve.spec.proposer import NgramProposer, Proposal, Proposer, SpecRequest

if TYPE_CHECKING:
    from rtserve.config import SpeculativeConfig
    from rtserve.protocol import SpecDecodeStats


@dataclass(frozen=True)
class DraftStep:
    """The step that drafts would join, as the engine sees it before scheduling."""

    num_decodes: int  # decode rows without drafts
    num_prefill_tokens: int  # prefill tokens the step is expected to hold
    cost_model_s: Callable[[int], float]  # the engine's cost model: step seconds with n draft rows added
    time_budget_s: float = math.inf  # the real-time policy's bound on the step's time, drafts included


class Speculator:
    def __init__(self, proposer: Proposer, max_k: int, adaptive: bool = True) -> None:
        if max_k <= 0:
            raise ValueError(f"num_speculative_tokens must be positive, got {max_k}")
        self.proposer, self.max_k, self.adaptive = proposer, max_k, adaptive
        self.tracker = AcceptanceTracker(max_k)
        self.chooser = SpecLengthChooser(max_k)
        self.step_times = StepTimeTable()
        self.correction = DraftCostCorrection()
        self.calibration = SpeedupCalibration()
        # This step's prediction for its drafts: (seconds without drafts, seconds with, speed-up), and
        # what its verification accepted.
        self._verify_prediction: tuple[float, float, float] | None = None
        self._step_drafts = self._step_accepted = 0
        # After a step where no request could pay for a draft, the next 1, 2, then up to
        # `MAX_IDLE_SKIP` steps do not even ask (the chooser's scan costs ~0.5 ms at 32 streams).
        self._idle_backoff = self._skip_steps = 0
        self._propose_s = 0.0  # time spent proposing in the current step
        self._prior_keys: dict[str, int] = {}  # request id -> prior key of this step's proposal
        # Measured proposing time per request asked (EWMA): a cheap proposer is not free in Python
        # once 32 requests ask it every step, and the chooser weighs it against the drafts' gain.
        self._propose_s_per_request = 0.0

    @property
    def name(self) -> str:
        return self.proposer.name

    def propose(self, requests: Sequence[SpecRequest], caps: Sequence[int], step: DraftStep) -> list[Proposal]:
        """Proposals (possibly empty) for `requests`, at most caps[i] tokens each.

        Adaptive: k per request is what the chooser finds worth its predicted cost in this step. A
        cheap proposer (n-gram) is first asked nothing at all unless some request's best possible
        acceptance could pay for a draft (so a step where nobody speculates costs what a step with
        speculation off does), then k is chosen within what it found, at the rate of its match.
        An expensive one (draft model) is told k first, so it never drafts tokens that will not be
        verified.
        """
        start = time.perf_counter()
        self.tracker.tick()
        self.correction.tick()
        self.calibration.tick()
        self._verify_prediction = None
        caps = [min(c, self.max_k) for c in caps]
        if not self.adaptive:
            proposals = self.proposer.propose(requests, caps)
        elif self._skip_steps > 0:
            self._skip_steps -= 1
            proposals = [Proposal([]) for _ in requests]
        else:
            proposals = self._propose_adaptive(requests, caps, step)
        self._prior_keys = {r.request_id: p.prior_key for r, p in zip(requests, proposals) if p.token_ids}
        self._propose_s = time.perf_counter() - start
        return proposals

    def _observe_propose(self, num_requests: int, seconds: float) -> None:
        if num_requests > 0:
            self._propose_s_per_request += 0.1 * (seconds / num_requests - self._propose_s_per_request)

    def _propose_adaptive(self, requests: Sequence[SpecRequest], caps: list[int], step: DraftStep) -> list[Proposal]:
        predicted_s, budget_s = self._step_time_fn(step), step.time_budget_s
        base_s, scale = predicted_s(0), self.correction.scale
        extra = self.calibration.required_gain(self.chooser.min_rel_gain)

        def step_time_s(m: int) -> float:  # drafts' predicted extra time, corrected by what it measured
            return base_s + scale * (predicted_s(m) - base_s) if m else base_s

        none = [Proposal([]) for _ in requests]
        if not self.proposer.is_cheap:
            rates = [self.tracker.rate(r.request_id) for r in requests]
            ks = self.chooser.choose(rates, caps, step_time_s, self.proposer.cost_s, budget_s, extra)
            self._expect_verify(step, base_s, predicted_s(sum(ks)), sum(ks))
            return self.proposer.propose(requests, ks) if any(ks) else none
        asking = [r for r, c in zip(requests, caps) if c > 0]
        propose_s = self._propose_s_per_request * len(asking)

        def draft_s(num_rounds: int, num_tokens: int) -> float:
            return propose_s if num_tokens > 0 else 0.0

        bound = self.chooser.choose([self.tracker.best_rate(r.request_id) for r in requests], caps, step_time_s,
                                    draft_s, max_step_s=budget_s, extra_gain=extra)
        if not any(bound):
            self._idle_backoff = min(2 * self._idle_backoff or 1, MAX_IDLE_SKIP)
            self._skip_steps = self._idle_backoff
            return none
        self._idle_backoff = 0
        start = time.perf_counter()
        proposals = self.proposer.propose(requests, bound)
        self._observe_propose(sum(1 for k in bound if k > 0), time.perf_counter() - start)
        rates = [self.tracker.rate(r.request_id, p.prior_key) for r, p in zip(requests, proposals)]
        # Proposing is paid by now: the second choice weighs only the verify rows.
        ks = self.chooser.choose(rates, [p.num_tokens for p in proposals], step_time_s, max_step_s=budget_s,
                                 extra_gain=extra)
        self._expect_verify(step, base_s, predicted_s(sum(ks)), sum(ks))
        return [_truncate(p, k) for p, k in zip(proposals, ks)]

    def _expect_verify(self, step: DraftStep, base_s: float, with_drafts_s: float, num_drafts: int) -> None:
        """Remember the uncorrected prediction of a decode-only verify step, to correct by its outcome."""
        if num_drafts > 0 and step.num_prefill_tokens == 0:
            self._verify_prediction = (base_s, with_drafts_s, self.chooser.predicted_speedup)

    def _step_time_fn(self, step: DraftStep) -> Callable[[int], float]:
        """Predicted step seconds with m draft rows: measured decode-only steps of that many rows when
        the step is decode-only (the cost model where none were measured), else the cost model."""
        if step.num_prefill_tokens > 0:
            return step.cost_model_s
        num_decodes, model_s = step.num_decodes, step.cost_model_s
        curve = self.step_times.curve(lambda n: model_s(n - num_decodes))
        return lambda m: curve(num_decodes + m)

    def observe(self, request_id: str, num_draft: int, num_accepted: int) -> None:
        self.tracker.observe(request_id, num_draft, num_accepted, self._prior_keys.get(request_id, 0))
        self._step_drafts += num_draft
        self._step_accepted += num_accepted

    def observe_step(self, num_decode_rows: int, num_prefill_tokens: int, step_s: float) -> None:
        """A step took `step_s` in all; proposing time is not the target's. Decode-only steps (drafts
        are decode rows) are the measurements the chooser predicts from."""
        target_s = max(step_s - self._propose_s, 0.0)
        if num_prefill_tokens == 0 and num_decode_rows > 0:
            num_decodes = num_decode_rows - self._step_drafts
            if self._verify_prediction is not None and self._step_drafts > 0 and num_decodes > 0:
                base_s, with_drafts_s, predicted_speedup = self._verify_prediction
                self.correction.observe(with_drafts_s - base_s, target_s - base_s)
                realized = (num_decodes + self._step_accepted) / num_decodes * base_s / max(target_s, 1e-9)
                self.calibration.observe(predicted_speedup, realized)
            self.step_times.observe(num_decode_rows, target_s)
        self._propose_s, self._verify_prediction = 0.0, None
        self._step_drafts = self._step_accepted = 0

    def free(self, request_id: str) -> None:
        self.tracker.free(request_id)
        self.proposer.free(request_id)

    def stats(self) -> "SpecDecodeStats":
        from rtserve.protocol import SpecDecodeStats
        t = self.tracker
        return SpecDecodeStats(self.name, t.num_drafts, t.num_draft_tokens, t.num_accepted_tokens,
                               list(t.num_accepted_tokens_per_pos))


MAX_IDLE_SKIP = 4


def _truncate(p: Proposal, k: int) -> Proposal:
    if k >= p.num_tokens:
        return p
    return Proposal(p.token_ids[:k], None if p.probs is None else p.probs[:k], p.prior_key)


def build_speculator(config: "SpeculativeConfig", block_size: int, device: str = "cpu",
                     weights_cache_dir: str = "", proposer: Proposer | None = None,
                     vocab_size: int | None = None) -> Speculator | None:
    """The speculator `config` asks for (None when off). `proposer` overrides the one it would build
    (tests pass a draft model built from in-memory weights). A draft model must share the target's
    vocabulary (`vocab_size`): its distributions are compared token by token."""
    if not config.enabled:
        return None
    if proposer is None and config.method == "ngram":
        proposer = NgramProposer(config.ngram_min, config.ngram_max)
    elif proposer is None:
        from rtserve.model.loader import load_model
        from rtserve.spec.draft_model import DraftModelProposer
        if not config.draft_model:
            raise ValueError("speculative method 'draft' needs a draft_model path")
        loaded = load_model(config.draft_model, weights_cache_dir)
        proposer = DraftModelProposer.from_weights(loaded.config, loaded.weights, config.draft_num_blocks,
                                                   block_size, device)
    draft_vocab = getattr(getattr(proposer, "cfg", None), "vocab_size", vocab_size)
    if vocab_size is not None and draft_vocab != vocab_size:
        raise ValueError(f"draft model vocabulary ({draft_vocab}) differs from the target's ({vocab_size})")
    return Speculator(proposer, config.num_speculative_tokens, config.adaptive)
