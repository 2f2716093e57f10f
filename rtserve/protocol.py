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
    # A firm request's budget ran out: before its first token (TTFT budget passed while queued or
    # prefilling; no token was sent) or while streaming (its whole-response deadline_ms passed).
    # Its KV blocks are freed at once; `error` says which budget and by how much.
    DEADLINE = "deadline"


class RTClass:
    """Real-time request classes (see rtserve/engine/rt_policy.py for what each one guarantees)."""

    FIRM = "firm"    # refused at once if it cannot make its deadline, dropped if it becomes late
    SOFT = "soft"    # best effort; misses are counted
    BATCH = "batch"  # no deadline; fills leftover capacity, never starves forever
    ALL = (FIRM, SOFT, BATCH)


@dataclass
class RTParams:
    """A request's latency budgets, in seconds (the API edge converts from milliseconds).

    None means "the server's default for this class" until the engine resolves it (see
    `rt_policy.resolve_rt`); after resolution None means "no such budget" (batch has none).
    """

    rt_class: str = RTClass.SOFT
    ttft_s: float | None = None      # arrival -> first token
    itl_s: float | None = None       # between consecutive tokens
    deadline_s: float | None = None  # arrival -> last token (the whole response)


@dataclass
class EngineCoreRequest:
    """API process -> engine core: one sequence to generate."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float  # time.monotonic() in the API process
    eos_token_ids: tuple[int, ...] = ()
    rt: RTParams = field(default_factory=RTParams)


@dataclass
class EngineCorePause:
    """API process -> engine core: stop (or resume) scheduling these requests; they keep their KV.

    Sent when a stream's output buffer is full because its client stopped reading (backpressure).
    """

    request_ids: list[str]
    paused: bool = True


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
    num_preemptions: int = 0  # cumulative for this request (metrics per class)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpecDecodeStats:
    """Speculative decoding counters (cumulative), named after vLLM's spec-decode metrics.

    A draft is one verify step of one request with k >= 1 proposed tokens; position j counts drafts
    whose (j+1)-th token was accepted. Acceptance rate = num_accepted_tokens / num_draft_tokens;
    mean accepted length = 1 + num_accepted_tokens / num_drafts (the target's own token included).
    """

    method: str = ""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_len(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


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
    queue: QueueSnapshot | None = None  # what admission control needs (real-time policy)
    spec_decode: SpecDecodeStats | None = None  # None: speculative decoding is off
    cost_model_source: str = "prior"  # the step-time model at start: "prior", "warmup" or "cache"


@dataclass
class QueueSnapshot:
    """The scheduler's queue and cost model after a step: enough to predict a new request's TTFT.

    `waiting` holds `(order_key, num_prefill_tokens)` per waiting request in the policy's order, and
    `running_prefills` the same for running requests with prompt tokens left; an order key is the
    policy's `(tier, time)` (rtserve/engine/rt_params.py). `num_free_slots` is how many more
    sequences may join the running set now: below `max_num_seqs`, and under the deadline policy also
    below its ITL-based cap for a firm request (negative: that many must finish first).
    `num_preemptible` counts running requests a waiting firm request may preempt to take their slot
    (the deadline policy's victims: batch and soft work).
    `num_requests_added` counts every EngineCoreRequest the core has received, so the client knows
    which of the requests it sent are not yet reflected here.
    """

    timestamp: float
    policy: str
    num_requests_added: int
    waiting: list[tuple[tuple[int, float], int]] = field(default_factory=list)
    num_running: int = 0
    num_decodes: int = 0
    num_masked_decodes: int = 0  # of those, decodes under a grammar's token mask (each step costs more)
    running_prefills: list[tuple[tuple[int, float], int]] = field(default_factory=list)
    num_context_tokens: int = 0
    running_remaining_tokens: list[int] = field(default_factory=list)  # ascending, max_tokens bound
    num_free_slots: int = 0
    num_preemptible: int = 0
    step_s: float = 0.0  # predicted duration of the step that starts as this snapshot is sent
    prefill_token_budget: int = 1
    cost_coeffs: tuple[float, ...] = ()
    cost_calibrated: bool = False
    cost_mean_abs_error_s: float = 0.0
    cost_mean_rel_error: float = 0.0


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
    backend: str = ""  # what runs the model, in one line (rtserve/engine/startup.describe_backend)


@dataclass
class EngineCoreFailed:
    """Engine core -> API process: the engine cannot continue (load failure or a fatal loop error)."""

    error: str


@dataclass
class EngineCoreShutdown:
    """API process -> engine core: finish the loop and exit."""
