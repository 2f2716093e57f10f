"""What the engine client hands to its callers (API routes, the offline LLM)."""
from __future__ import annotations

from dataclasses import dataclass, field

from rtserve.client.rt_report import RTReport
from rtserve.protocol import TokenLogprob


@dataclass
class RequestOutput:
    """One streamed delta of a request (or, from the offline API, the whole result).

    `text`/`token_ids`/`logprobs` are what is new since the previous delta; the counts are cumulative.
    Text is held back while it could still be the start of a stop string or an incomplete UTF-8 char.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    rt: RTReport | None = None  # on the finished delta only: budgets, measured TTFT/ITL, misses
