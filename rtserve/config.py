"""Frozen configuration dataclasses, one per layer. Imports nothing from the package."""
from __future__ import annotations

import math
from dataclasses import dataclass, field



# The step-time model's prior (rtserve/engine/cost_model.py, its `StepFeatures` order): seconds per
# step, per decode, per prefill token, per context token, per 10^6 prefill attention pairs, per
# prefill chunk. Only an uncalibrated model predicts from it.
COST_PRIOR_S = (0.005, 0.0005, 0.0001, 0.0, 0.5, 0.005)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (HF `LlamaConfig` field meanings)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("ModelConfig.num_heads must be a multiple of num_kv_heads")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry."""

    block_size: int = 16
    num_blocks: int = 0  # 0: derive from kv_cache_bytes
    kv_cache_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("CacheConfig.block_size must be a positive power of two")
        if self.num_blocks < 0 or self.kv_cache_bytes <= 0:
            raise ValueError("CacheConfig.num_blocks/kv_cache_bytes must be non-negative/positive")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: a per-step token budget shared by decodes and prefill chunks."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int = 8192
    long_prefill_token_threshold: int = 0  # 0: a single prompt may take the whole budget

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0 or self.max_model_len <= 0:
            raise ValueError("SchedulerConfig limits must be positive")


@dataclass(frozen=True)
class LimitsConfig:
    """Caps on what one request may ask for (validated at the API edge and again in the engine)."""

    max_tokens_cap: int = 4096
    max_n: int = 8
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_string_len: int = 256


@dataclass(frozen=True)
class RTClassDefaults:
    """Budgets a request of one class gets when it does not set them (seconds; None: no budget)."""

    ttft_s: float | None = 0.5
    itl_s: float | None = 0.05
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "itl_s", "deadline_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"RTClassDefaults.{name} must be positive")


SOFT_OVERLOAD_MODES = ("serve-late", "reject")  # RTConfig.soft_overload


@dataclass(frozen=True)
class RTConfig:
    """Real-time scheduling: policy, per-class default budgets, admission and backpressure bounds.

    `policy="fcfs"` is arrival order with no deadline-based admission, no expiry and no ITL-based
    limits (the vLLM-like baseline to compare against); `"deadline"` orders by deadline in tiers (on
    time, late, batch), sizes each step and the running set to the streams' ITL budgets, admits firm
    requests only if they can make their TTFT, and drops firm requests that become late
    (rtserve/engine/rt_policy.py).
    """

    policy: str = "deadline"
    firm: RTClassDefaults = field(default_factory=RTClassDefaults)
    soft: RTClassDefaults = field(default_factory=RTClassDefaults)
    batch: RTClassDefaults = field(default_factory=lambda: RTClassDefaults(None, None, None))
    batch_max_wait_s: float = 30.0    # a batch request waits at most this long behind deadline work
    min_prefill_chunk: int = 8        # prefill tokens per step even when ITL slack is exhausted
    step_slack_fraction: float = 0.8  # steps end within this share of the tightest slack, at most
    rescue_step_fraction: float = 0.6  # a step stretched to save a TTFT lasts at most this share of it
    background_slot_share: float = 0.5  # late and batch work joins only below this share of the ITL cap
    min_running: int = 8              # the ITL-based running-set cap never goes below this
    # A firm token must reach the client within its budget, not just be sampled within it: its
    # deadlines are this much earlier in the engine (sampling -> detokenize -> SSE measured 1-10 ms).
    firm_delivery_margin_s: float = 0.005
    # A soft request predicted to start later than its TTFT budget: "serve-late" admits it anyway;
    # "reject" refuses it at admission when it would be more than `soft_overload_bound_s` late (deadline policy).
    soft_overload: str = "serve-late"
    soft_overload_bound_s: float = 1.0
    max_num_waiting: int = 256        # bounded waiting queue (requests) ...
    max_waiting_tokens: int = 262144  # ... and prompt tokens; beyond either: 429/529
    max_buffered_outputs: int = 64    # per-stream deltas held for a slow reader before pausing it
    slow_reader_timeout_s: float = 30.0  # a paused stream is aborted after this long
    cost_prior_s: tuple[float, ...] = COST_PRIOR_S  # the step-time model's prior coefficients
    cost_window: int = 256            # the step-time model is fitted over this many recent steps
    cost_min_samples: int = 8         # steps measured before predictions are trusted
    # Before ready, measure the step-time model on warm-up steps (at most `calibration_budget_s`), or
    # load the one an earlier start stored under `calibration_cache_dir` ("" = <weights cache>/calibration).
    calibrate: bool = True
    calibration_budget_s: float = 5.0
    calibration_cache_dir: str = ""

    def __post_init__(self) -> None:
        if self.policy not in ("deadline", "fcfs"):
            raise ValueError("RTConfig.policy must be 'deadline' or 'fcfs'")
        if min(self.batch_max_wait_s, self.slow_reader_timeout_s) <= 0:
            raise ValueError("RTConfig timeouts must be positive")
        if not 0 < self.step_slack_fraction <= 1 or not 0 <= self.background_slot_share <= 1:
            raise ValueError("RTConfig.step_slack_fraction must be in (0, 1], background_slot_share in [0, 1]")
        if self.soft_overload not in SOFT_OVERLOAD_MODES:
            raise ValueError(f"RTConfig.soft_overload must be one of {', '.join(SOFT_OVERLOAD_MODES)}")
        if not 0 <= self.soft_overload_bound_s < math.inf:
            raise ValueError("RTConfig.soft_overload_bound_s must be a finite number >= 0")
        if not 0 <= self.rescue_step_fraction <= 1:
            raise ValueError("RTConfig.rescue_step_fraction must be in [0, 1]")
        if not 0 <= self.firm_delivery_margin_s < min((b for b in (self.firm.ttft_s, self.firm.itl_s) if b), default=math.inf):
            raise ValueError("RTConfig.firm_delivery_margin_s must be >= 0 and below the firm budgets")
        if not 0 < self.calibration_budget_s < math.inf:
            raise ValueError("RTConfig.calibration_budget_s must be positive")
        if min(self.min_prefill_chunk, self.max_num_waiting, self.max_waiting_tokens,
               self.max_buffered_outputs, self.cost_min_samples, self.cost_window) <= 0:
            raise ValueError("RTConfig counts must be positive")

    def defaults_for(self, rt_class: str) -> RTClassDefaults:
        if rt_class not in ("firm", "soft", "batch"):
            raise ValueError(f"unknown rt class {rt_class!r}")
        return getattr(self, rt_class)


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: who proposes draft tokens and how many a verify step may check.

    "ngram" looks the last tokens up in the request's own context (no model); "draft" runs a smaller
    model with the same tokenizer (`draft_model`: a GGUF file or HF directory). With `adaptive`, k is
    chosen per request and step (0 included) from measured acceptance and the step-time cost model;
    otherwise every decoding request verifies `num_speculative_tokens` when it has them.
    """

    method: str = "off"  # "off" | "ngram" | "draft"
    num_speculative_tokens: int = 4  # the largest k
    adaptive: bool = True
    ngram_min: int = 2
    ngram_max: int = 4
    draft_model: str = ""
    draft_num_blocks: int = 512  # the draft's own KV cache, in blocks of the target's block_size

    def __post_init__(self) -> None:
        if self.method not in ("off", "ngram", "draft"):
            raise ValueError(f"SpeculativeConfig.method must be 'off', 'ngram' or 'draft', got {self.method!r}")
        if self.num_speculative_tokens <= 0 or self.draft_num_blocks <= 0:
            raise ValueError("SpeculativeConfig.num_speculative_tokens/draft_num_blocks must be positive")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("SpeculativeConfig needs 1 <= ngram_min <= ngram_max")

    @property
    def enabled(self) -> bool:
        return self.method != "off"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine core needs; travels to the engine process as a whole."""

    model: str = ""  # path to a GGUF file or an HF directory; "" = embedded default model
    dtype: str = "float32"  # the reference path's weights/activations/KV (the fast path ignores it)
    # "auto": a GGUF whose layers are Q4_1 runs the quantized CPU fast path (int4/bf16/int8 kernels
    # chosen per step shape); anything else, or "none", runs the fp32 reference path (exact vs HF).
    quantization: str = "auto"
    device: str = "cpu"
    num_threads: int = 0  # 0: leave torch's default
    # Lower torch's thread count while other processes hold cores (engine/thread_governor.py); CPU only.
    adaptive_threads: bool = True
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    rt: RTConfig = field(default_factory=RTConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    weights_cache_dir: str = ""  # "" = ~/.cache/rtserve

    def __post_init__(self) -> None:
        if self.quantization not in ("auto", "none"):
            raise ValueError(f"EngineConfig.quantization must be 'auto' or 'none', "
                             f"got {self.quantization!r}")
