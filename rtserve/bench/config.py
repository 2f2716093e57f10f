"""Benchmark run configuration: one frozen dataclass, validated at construction, plus the parsers
for the `--goodput`, `--mix` and `--sweep-rates` flag syntaxes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

WORKLOADS = ("synthetic", "chat", "shared-prefix", "realtime-mix", "long-prompt-interference")
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
LEN_DISTS = ("fixed", "uniform", "lognormal")
RT_CLASSES = ("firm", "soft", "batch")
DEFAULT_NUM_REQUESTS = 100  # used when neither --num-requests nor --duration-s is given
_SLO_KEYS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "itl": "itl_ms", "e2e": "e2e_ms", "e2el": "e2e_ms"}


@dataclass(frozen=True)
class SloLimits:
    """Per-request SLO limits in milliseconds; None = not constrained.

    A request meets them when it completed and each given quantity is <= its limit: TTFT, TPOT
    (vLLM's per-request (e2e - ttft)/(n - 1), 0 when n <= 1), ITL as the request's *largest*
    inter-chunk gap (a per-token deadline constrains every gap), and end-to-end latency.
    """

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def is_empty(self) -> bool:
        return all(v is None for v in (self.ttft_ms, self.tpot_ms, self.itl_ms, self.e2e_ms))

    def as_dict(self) -> dict[str, float]:
        items = {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "itl_ms": self.itl_ms,
                 "e2e_ms": self.e2e_ms}
        return {k: v for k, v in items.items() if v is not None}


def parse_goodput(items: list[str] | None) -> SloLimits:
    """`["ttft:500", "tpot:50"]` or `["ttft:500,tpot:50"]` -> SloLimits (values in ms)."""
    values: dict[str, float] = {}
    for item in items or []:
        for part in filter(None, item.replace(",", " ").split()):
            key, sep, value = part.partition(":")
            if not sep or key not in _SLO_KEYS:
                raise ValueError(f"bad --goodput item {part!r}; use ttft|tpot|itl|e2e:<ms>")
            limit_ms = float(value)
            if not limit_ms > 0:
                raise ValueError(f"--goodput {key} must be > 0 ms, got {value}")
            values[_SLO_KEYS[key]] = limit_ms
    return SloLimits(**values)


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """`"firm:0.3,soft:0.5,batch:0.2"` -> shares normalised to sum to 1, in RT_CLASSES order."""
    shares: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.strip().partition(":")
        if not sep or name not in RT_CLASSES:
            raise ValueError(f"bad --mix item {part!r}; use firm|soft|batch:<share>")
        shares[name] = float(value)
    total = sum(shares.values())
    if total <= 0 or any(v < 0 for v in shares.values()):
        raise ValueError(f"--mix shares must be >= 0 and not all 0: {text!r}")
    return tuple((name, shares[name] / total) for name in RT_CLASSES if shares.get(name))


def parse_rates(text: str) -> tuple[float, ...]:
    """`"1,2,4,inf"` -> (1.0, 2.0, 4.0, inf); every rate must be > 0."""
    rates = tuple(float(part) for part in text.split(",") if part.strip())
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"rates must be > 0 (or inf): {text!r}")
    return rates


@dataclass(frozen=True)
class BenchConfig:
    """Everything one `rtserve bench` run needs; lengths are in (approximate) tokens."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id of GET /v1/models
    api_key: str | None = None
    endpoint: str = "chat"  # chat | completions
    workload: str = "synthetic"
    rates_per_s: tuple[float, ...] = (math.inf,)  # one phase per rate
    burstiness: float = 1.0  # gamma shape; 1.0 = Poisson
    max_concurrency: int | None = None
    num_requests: int | None = None  # per phase
    duration_s: float | None = None  # per phase; in-flight requests are then cancelled
    seed: int = 0
    input_len: int = 256
    output_len: int | None = None  # None: the workload's own default
    len_dist: str = "fixed"
    prefix_len: int = 1024  # shared-prefix: the common system prompt
    long_input_len: int = 2048  # batch summaries and interfering long prompts
    long_output_len: int = 128
    long_every: int = 8  # long-prompt-interference: every Nth request is long
    mix: tuple[tuple[str, float], ...] = (("firm", 0.3), ("soft", 0.5), ("batch", 0.2))
    rt_extension: bool | None = None  # None: on when /v1/models says owned_by "rtserve"
    rt_ttft_ms: float = 500.0
    rt_itl_ms: float = 50.0
    rt_deadline_ms: float | None = None
    ignore_eos: bool = False
    extra_body: dict = field(default_factory=dict)
    goodput: SloLimits = field(default_factory=SloLimits)
    timeout_s: float = 600.0
    result_dir: str | None = None
    show_progress: bool = True
    make_plots: bool = True
    command_line: str = ""

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {self.endpoint!r}")
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.workload!r}")
        if self.len_dist not in LEN_DISTS:
            raise ValueError(f"len-dist must be one of {LEN_DISTS}, got {self.len_dist!r}")
        if not self.rates_per_s or any(not r > 0 for r in self.rates_per_s):
            raise ValueError("every rate must be > 0 (inf = all at once)")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        for name in ("max_concurrency", "num_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        for name in ("input_len", "prefix_len", "long_input_len", "long_output_len", "long_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.output_len is not None and self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")
        unbounded = self.num_requests is None and self.max_concurrency is None
        if self.duration_s is not None and unbounded and math.inf in self.rates_per_s:
            raise ValueError("rate inf with only --duration-s never stops sending: "
                             "add --num-requests or --max-concurrency")

    @property
    def request_limit(self) -> int | None:
        """Requests per phase; None = bounded by duration only."""
        if self.num_requests is None and self.duration_s is None:
            return DEFAULT_NUM_REQUESTS
        return self.num_requests

    @property
    def endpoint_path(self) -> str:
        return ENDPOINTS[self.endpoint]
