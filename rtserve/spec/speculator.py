"""Speculator: the engine's one handle on speculative decoding (proposer + acceptance + k chooser).

Before each schedule the engine asks for proposals for the decoding requests; the scheduler then
counts 1 + k tokens for each (the last token plus k drafts) and the runner verifies them. After the
step the engine reports what was accepted (acceptance estimates, metrics) and how long the step took
(the measured step-time table the k chooser prefers over the linear cost model).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Sequence

from rtserve.spec.adaptive import AcceptanceTracker, SpecLengthChooser, StepTimeTable
from rtserve.spec.proposer import NgramProposer, Proposal, Proposer, SpecRequest

if TYPE_CHECKING:
    from rtserve.config import SpeculativeConfig
    from rtserve.protocol import SpecDecodeStats


class Speculator:
    def __init__(self, proposer: Proposer, max_k: int, adaptive: bool = True) -> None:
        if max_k <= 0:
            raise ValueError(f"num_speculative_tokens must be positive, got {max_k}")
        self.proposer, self.max_k, self.adaptive = proposer, max_k, adaptive
        self.tracker = AcceptanceTracker(max_k)
        self.chooser = SpecLengthChooser(max_k)
        self.step_times = StepTimeTable()
        self._propose_s = 0.0  # time spent proposing in the current step

    @property
    def name(self) -> str:
        return self.proposer.name

    def propose(self, requests: Sequence[SpecRequest], caps: Sequence[int], num_step_tokens: int,
                cost_model_s: Callable[[int], float]) -> list[Proposal]:
        """Proposals (possibly empty) for `requests`, at most caps[i] tokens each.

        num_step_tokens: tokens the step holds without drafts; cost_model_s(n): the engine's
        predicted step time with n draft tokens added (used where no step of that size was timed).
        A cheap proposer (n-gram) proposes first and k is chosen within what it found; an expensive
        one (draft model) is told k first, so it never drafts tokens that will not be verified.
        """
        start = time.perf_counter()
        caps = [min(c, self.max_k) for c in caps]
        if not self.adaptive:
            proposals = self.proposer.propose(requests, caps)
        else:
            def step_time_s(n: int) -> float:
                return self.step_times.predict(num_step_tokens + n, lambda m: cost_model_s(m - num_step_tokens))

            rates = [self.tracker.rate(r.request_id) for r in requests]
            if self.proposer.is_cheap:
                proposals = self.proposer.propose(requests, caps)
                ks = self.chooser.choose(rates, [p.num_tokens for p in proposals], step_time_s)
                proposals = [_truncate(p, k) for p, k in zip(proposals, ks)]
            else:
                ks = self.chooser.choose(rates, caps, step_time_s, self.proposer.cost_s)
                proposals = self.proposer.propose(requests, ks)
        self._propose_s = time.perf_counter() - start
        return proposals

    def observe(self, request_id: str, num_draft: int, num_accepted: int) -> None:
        self.tracker.observe(request_id, num_draft, num_accepted)

    def observe_step(self, num_tokens: int, step_s: float) -> None:
        """A step of `num_tokens` took `step_s` in all; proposing time is not the target's."""
        self.step_times.observe(num_tokens, max(step_s - self._propose_s, 0.0))
        self._propose_s = 0.0

    def free(self, request_id: str) -> None:
        self.tracker.free(request_id)
        self.proposer.free(request_id)

    def stats(self) -> "SpecDecodeStats":
        from rtserve.protocol import SpecDecodeStats
        t = self.tracker
        return SpecDecodeStats(self.name, t.num_drafts, t.num_draft_tokens, t.num_accepted_tokens,
                               list(t.num_accepted_tokens_per_pos))


def _truncate(p: Proposal, k: int) -> Proposal:
    if k >= p.num_tokens:
        return p
    return Proposal(p.token_ids[:k], None if p.probs is None else p.probs[:k])


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
