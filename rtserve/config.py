"""Frozen configuration dataclasses, one per layer. Imports nothing from the package."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field



# The step-time model's prior (rtserve/engine/cost_model.py, its `StepFeatures` order): seconds per
# step, per decode, per prefill token, per context token, per 10^6 prefill attention pairs, per
# prefill chunk. Only an uncalibrated model predicts from it.
COST_PRIOR_S = (0.005, 0.0005, 0.0001, 0.0, 0.5, 0.005)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (HF config field meanings).

    The defaults are plain Llama; each other family (`rtserve/model/families.py`) is a set of the
    choices below, read from its config, nothing per checkpoint."""

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
    model_type: str = "llama"
    hidden_act: str = "silu"            # the MLP gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    norm_weight_offset: float = 0.0     # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    qkv_bias: bool = False              # bias on the q/k/v projections
    o_bias: bool = False                # bias on the attention output projection
    mlp_bias: bool = False              # bias on gate/up/down
    qk_norm: bool = False               # RMSNorm over head_dim on each query and key head, before RoPE
    sandwich_norms: bool = False        # also a norm on the attention and MLP outputs (Gemma 2/3)
    embed_scale: float = 1.0            # embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float = 0.0  # attention scale is its -1/2 power; 0: head_dim
    final_logit_softcapping: float = 0.0  # logits = c * tanh(logits / c); 0: none
    # RoPE of full-attention layers: "default", "linear" (positions / factor) or "llama3" (Llama
    # 3.1 frequency smoothing); rope_freq_factors (GGUF `rope_freqs`) divide the inverse frequencies.
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 0
    rope_freq_factors: tuple[float, ...] = ()
    # Local attention: layer i attends to its last `sliding_window` positions (itself included) when
    # layer_types[i] == "sliding_attention"; () means every layer is "full_attention".
    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float = 0.0       # sliding layers' plain-RoPE base; 0: the full layers' RoPE

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("ModelConfig.num_heads must be a multiple of num_kv_heads")
        for name in ("eos_token_ids", "layer_types", "rope_freq_factors"):  # JSON gives lists back
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"ModelConfig.hidden_act must be 'silu' or 'gelu_tanh', got {self.hidden_act!r}")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"ModelConfig.rope_type {self.rope_type!r} is not supported")
        if self.rope_type == "llama3" and self.rope_original_max_position <= 0:
            raise ValueError("ModelConfig.rope_original_max_position must be positive for llama3 RoPE")
        if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError("ModelConfig.rope_freq_factors needs head_dim / 2 values")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError("ModelConfig.layer_types needs one entry per layer")
        if set(self.layer_types) - {"full_attention", "sliding_attention"}:
            raise ValueError(f"ModelConfig.layer_types: unknown {sorted(set(self.layer_types))}")
        if "sliding_attention" in self.layer_types and self.sliding_window <= 0:
            raise ValueError("ModelConfig.sliding_window must be positive for sliding_attention layers")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per layer, the positions it attends back over (itself included); 0 = the whole context."""
        return tuple(self.sliding_window if t == "sliding_attention" else 0
                     for t in (self.layer_types or ("full_attention",) * self.num_layers))

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


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
    # deadlines are this much earlier in the engine. The way out (sampling -> API process -> detokenize
    # -> SSE -> a client on the same busy 2-core host) took up to 9 ms at the tail: firm gaps of 52-54 ms
    # reached the benchmark client when the engine had sent them within 45. A larger margin costs
    # firm streams: at 15 ms nearly every firm stream of the realtime mix was dropped here.
    firm_delivery_margin_s: float = 0.010
    # A soft stream is judged by its mean pace (TPOT), over which that jitter averages out: its steps
    # leave room for the typical way out only.
    delivery_margin_s: float = 0.005
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
        if not 0 <= self.delivery_margin_s < min((b for b in (self.soft.itl_s, self.firm.itl_s) if b), default=math.inf):
            raise ValueError("RTConfig.delivery_margin_s must be >= 0 and below the ITL budgets")
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
class HygieneConfig:
    """Real-time hygiene of the engine process (rtserve/engine/rt_hygiene.py), applied after warm-up.

    `gc`: the heap built by start-up is frozen (`gc.freeze`) and the automatic collector is off; the
    same generational collections run between steps instead (young ones after `gc_young_budget` net
    allocations, a full one every tenth, and a full one whenever the engine goes idle).
    `prefault_kv`: every page of the KV cache is written once before ready, so no step pays the first
    touch of a block. `mlock`: mlockall(current and future). `cpus`: the engine process's CPU list
    ("0-3,6"; "" leaves it). `sched`: "fifo" or "rr" (real-time class, `sched_priority`), "nice"
    (`nice` added to the niceness), or "" (unchanged). Each measure that the system refuses is logged in
    one line and skipped.
    """

    gc: bool = True
    gc_young_budget: int = 20000
    prefault_kv: bool = True
    mlock: bool = False
    cpus: str = ""
    sched: str = ""
    sched_priority: int = 1
    nice: int = -5

    def __post_init__(self) -> None:
        if self.sched not in ("", "fifo", "rr", "nice"):
            raise ValueError(f"HygieneConfig.sched must be '', 'fifo', 'rr' or 'nice', got {self.sched!r}")
        if self.gc_young_budget <= 0 or not 1 <= self.sched_priority <= 99 or not -20 <= self.nice <= 19:
            raise ValueError("HygieneConfig: gc_young_budget > 0, sched_priority in 1..99, nice in -20..19")
        parse_cpu_list(self.cpus)


def parse_cpu_list(text: str) -> set[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}; '' -> set() (ValueError naming the bad part)."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"CPU list: {part!r} is not a number or a range like 0-3") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"CPU list: bad range {part!r}")
        cpus.update(range(lo, hi + 1))
    return cpus


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
    # What runs the model: auto | reference | cpu | cuda (rtserve/engine/backend.py sets the device,
    # quantization and dtype for it at start-up).
    backend: str = "auto"
    num_threads: int = 0  # 0: leave torch's default
    # Lower torch's thread count while other processes hold cores (engine/thread_governor.py); CPU only.
    adaptive_threads: bool = True
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    rt: RTConfig = field(default_factory=RTConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    hygiene: HygieneConfig = field(default_factory=HygieneConfig)
    weights_cache_dir: str = ""  # "" = ~/.cache/rtserve
    # Build the grammar engine (xgrammar and the model's vocabulary for it) before ready, so the first
    # constrained request does not wait for it (seconds on a CPU host); off: built on first use.
    preload_grammar: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "reference", "cpu", "cuda"):
            raise ValueError(f"EngineConfig.backend must be auto, reference, cpu or cuda, got {self.backend!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
                and self.device[5:].isdigit()):
            raise ValueError(f"EngineConfig.device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.quantization not in ("auto", "none"):
            raise ValueError(f"EngineConfig.quantization must be 'auto' or 'none', "
                             f"got {self.quantization!r}")


def default_cache_dir(cache_dir: str = "") -> str:
    """Where converted weights, tokenizers, kernels and calibrations are cached: `cache_dir`, else
    `~/.cache/rtserve`."""
    return cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "rtserve")
