"""Per-request sampling parameters, validated at construction. Imports nothing from the package."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputs:
    """A grammar the output must follow, in source form (compiled in the engine, cached by `key`).

    kind: "json" (spec = a JSON schema as JSON text), "json_object" (any JSON object; spec unused),
    "regex", "choice" (spec = a JSON list of the allowed strings), "grammar" (EBNF, xgrammar's
    dialect) or "structural_tag" (spec = an xgrammar structural tag as JSON text: tool calls).
    """

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured_outputs kind must be one of {STRUCTURED_KINDS}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError("structured_outputs spec must be a string")

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.spec


@dataclass
class SamplingParams:
    """What to sample and when to stop.

    temperature == 0 means greedy. top_k <= 0 disables top-k; top_p == 1 and min_p == 0 disable those.
    `logprobs=N` returns the sampled token's logprob plus the N most likely (N=0: sampled only).
    Stop strings are matched on detokenized text across token boundaries and never appear in the
    output unless `include_stop_str_in_output`.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Penalties over the tokens generated so far (OpenAI semantics): logit -= frequency_penalty * count
    # + presence_penalty * (count > 0). repetition_penalty (> 0, 1 = off) divides positive logits and
    # multiplies negative ones of every token in the prompt or output (the HF / vLLM extension).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    structured: StructuredOutputs | None = None
    # Token ids the output is expected to mostly repeat (OpenAI's predicted outputs): proposed as
    # draft tokens and verified, so the output is what it would be without them, in fewer steps.
    prediction: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self, *, max_tokens_cap: int | None = None, max_n: int | None = None,
                 max_logprobs: int | None = None) -> None:
        """Raise ValueError naming the offending parameter."""
        _finite("temperature", self.temperature)
        _finite("top_p", self.top_p)
        _finite("min_p", self.min_p)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        _int_at_least("n", self.n, 1)
        if max_n is not None and self.n > max_n:
            raise ValueError(f"n must be <= {max_n}, got {self.n}")
        if self.max_tokens is not None:
            _int_at_least("max_tokens", self.max_tokens, 1)
            if max_tokens_cap is not None and self.max_tokens > max_tokens_cap:
                raise ValueError(f"max_tokens must be <= {max_tokens_cap}, got {self.max_tokens}")
        _int_at_least("min_tokens", self.min_tokens, 0)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None:
            _int_at_least("logprobs", self.logprobs, 0)
            if max_logprobs is not None and self.logprobs > max_logprobs:
                raise ValueError(f"logprobs must be <= {max_logprobs}, got {self.logprobs}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError("stop must be a list of non-empty strings")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")
        self._validate_processors()

    def _validate_processors(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            _finite(name, getattr(self, name))
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        _finite("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not isinstance(self.logit_bias, dict):
            raise ValueError("logit_bias must map token ids to numbers")
        for token_id, bias in self.logit_bias.items():
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {token_id!r}")
            _finite("logit_bias", bias)
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        if not isinstance(self.prediction, list) or any(
                not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.prediction):
            raise ValueError("prediction must be a list of token ids")
        if self.structured is not None and not isinstance(self.structured, StructuredOutputs):
            raise ValueError("structured must be a StructuredOutputs")
        if self.structured is not None and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with structured outputs (the grammar ends with EOS)")
        if self.structured is not None and self.min_tokens > 0:
            raise ValueError("min_tokens cannot be combined with structured outputs (the grammar decides the end)")

    @property
    def has_penalties(self) -> bool:
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _int_at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
