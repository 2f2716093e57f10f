"""Typed results passed scheduler -> runner -> scheduler within one engine step."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rtserve.engine.cost_model import StepFeatures, prefill_pairs
from rtserve.engine.request import Request
from rtserve.protocol import TokenLogprob


@dataclass
class ScheduledSeq:
    """`num_new_tokens` tokens of `request`, starting at position `start_pos`, are computed this step.

    With draft tokens, the last `len(spec_token_ids)` of them are the drafts (positions num_tokens..),
    verified this step: the runner returns the accepted ones plus one target token.
    """

    request: Request
    start_pos: int
    num_new_tokens: int
    block_ids: list[int]
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: torch.Tensor | None = None  # [len(spec_token_ids), V]; None: deterministic proposer

    @property
    def num_sequence_tokens(self) -> int:
        """Tokens of the request itself in this chunk (drafts excluded)."""
        return self.num_new_tokens - len(self.spec_token_ids)

    @property
    def do_sample(self) -> bool:
        """True when this chunk reaches the end of the sequence, so a next token is sampled."""
        return self.start_pos + self.num_sequence_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def step_features(self) -> StepFeatures:
        """What the cost model sees: decode rows (a one-token chunk, or a verify chunk's last token
        and drafts: the runner computes each as a decode row), prefill tokens (the rest), and the
        sampled rows a grammar masks (each constrained sequence that samples: 1 + its drafts)."""
        num_decodes = sum(s.num_new_tokens for s in self.seqs if s.num_sequence_tokens == 1)
        return StepFeatures(num_decodes=num_decodes,
                            num_prefill_tokens=self.num_scheduled_tokens - num_decodes,
                            num_context_tokens=sum(s.start_pos + s.num_new_tokens for s in self.seqs),
                            num_prefill_pairs=sum(prefill_pairs(s.num_new_tokens, s.start_pos)
                                                  for s in self.seqs if s.num_sequence_tokens != 1),
                            num_prefill_seqs=sum(1 for s in self.seqs if s.num_sequence_tokens != 1),
                            num_masked_rows=sum(1 + len(s.spec_token_ids) for s in self.seqs
                                                if s.do_sample and s.request.grammar is not None))


@dataclass
class RunnerOutput:
    """Sampled token (and optional logprobs) for every scheduled sequence with do_sample.

    A sequence verified with draft tokens appears in `spec_token_ids` instead: the accepted drafts
    followed by the target's next token (1 to k + 1 tokens). `logprobs` has one entry per emitted
    token, in order, for requests that asked for them.
    """

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
