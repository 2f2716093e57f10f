"""Per-request state inside the engine core. Progress is a token count, never a phase."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from rtserve.kv.hashing import BlockHash
from rtserve.protocol import RTClass, RTParams
from rtserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache at first admission
    # While waiting: prompt tokens the prefix cache holds now (the scheduler refreshes it each step),
    # where its prefill would start if admitted.
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_hashes: list[BlockHash] = field(default_factory=list)
    generator: torch.Generator | None = None  # seeded requests only; made by the runner on its device
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    rt: RTParams = field(default_factory=RTParams)  # resolved budgets (rt_policy.resolve_rt)
    # Deadlines are this much earlier than the budgets say (firm: the time from sampling a token to
    # the client receiving it; RTConfig.firm_delivery_margin_s), so on time here is on time there.
    deadline_margin_s: float = 0.0
    first_token_time: float | None = None  # time.monotonic() when the first token was sampled
    last_token_time: float | None = None
    is_paused: bool = False  # its client stopped reading: not scheduled, keeps its blocks
    # Draft tokens proposed to follow all_token_ids this step, and their draft distribution
    # [len, V] (None: deterministic proposer). Set before scheduling; never part of the sequence.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: torch.Tensor | None = None
    # The request's grammar state (rtserve/structured/matcher.RequestGrammar) when its output is
    # constrained; the runner masks its rows with it and advances it over the tokens it emits.
    grammar: Any = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_firm(self) -> bool:
        return self.rt.rt_class == RTClass.FIRM

    @property
    def ttft_deadline(self) -> float | None:
        return None if self.rt.ttft_s is None else self.arrival_time + self.rt.ttft_s - self.deadline_margin_s

    @property
    def deadline(self) -> float | None:
        return None if self.rt.deadline_s is None else self.arrival_time + self.rt.deadline_s - self.deadline_margin_s

    @property
    def itl_deadline(self) -> float | None:
        """When the next token is due by the ITL budget (None before the first token or without one)."""
        if self.last_token_time is None or self.rt.itl_s is None:
            return None
        return self.last_token_time + self.rt.itl_s - self.deadline_margin_s

    @property
    def next_token_deadline(self) -> float | None:
        """When the next token is due: the TTFT deadline before the first token, then last + ITL."""
        return self.ttft_deadline if self.last_token_time is None else self.itl_deadline

    @property
    def num_remaining_prefill_tokens(self) -> int:
        """Tokens to compute before the next token can be sampled, minus the one a decode costs."""
        return max(self.num_tokens - self.num_computed_tokens - 1, 0)

    def append_output_token(self, token_id: int, now: float | None = None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if now is not None:
            if self.first_token_time is None:
                self.first_token_time = now
            self.last_token_time = now
