"""Typed messages that cross the API-process / engine-core-process boundary.

Named for their direction: `EngineCoreRequest`/`EngineCoreAbort` go in, `EngineCoreOutputs` come out.
Imports nothing from the package except the (dependency-free) sampling params.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rtserve.sampling_params import SamplingParams


class FinishReason:
    """Why a request ended (strings so they cross the boundary as-is)."""

    STOP = "stop"      # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"    # the client went away or asked to cancel
    ERROR = "error"    # the engine failed this request (message in `error`)


@dataclass
class EngineCoreRequest:
    """API process -> engine core: one sequence to generate."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float  # time.monotonic() in the API process
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class EngineCoreAbort:
    """API process -> engine core: stop these requests and free their blocks."""

    request_ids: list[str]


@dataclass
class TokenLogprob:
    """Logprob of one generated token plus the top-N alternatives (ids and logprobs, best first)."""

    token_id: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class EngineCoreOutput:
    """Engine core -> API process: what one request produced in one step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id, when that is what stopped it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """Scheduler/KV snapshot after a step (feeds gauges and metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    prefix_cache_queries: int = 0  # cumulative prompt tokens looked up
    prefix_cache_hits: int = 0     # cumulative prompt tokens served from cache
    num_preemptions: int = 0       # cumulative
    step_time_s: float = 0.0
    num_scheduled_tokens: int = 0


@dataclass
class EngineCoreOutputs:
    """Engine core -> API process: everything one step produced."""

    outputs: list[EngineCoreOutput]
    timestamp: float  # time.monotonic() when the step finished
    stats: EngineStats | None = None


@dataclass
class EngineCoreReady:
    """Engine core -> API process, once: the model is loaded and the first step can run."""

    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    eos_token_ids: tuple[int, ...]


@dataclass
class EngineCoreFailed:
    """Engine core -> API process: the engine cannot continue (load failure or a fatal loop error)."""

    error: str


@dataclass
class EngineCoreShutdown:
    """API process -> engine core: finish the loop and exit."""
