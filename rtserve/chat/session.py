"""One terminal chat conversation: history, the real-time request settings, and one streamed answer.

`ChatSession.stream(client)` POSTs /v1/chat/completions with `stream: true` and yields `AnswerEvent`s as
SSE chunks arrive; closing the generator (Ctrl-C in the front end) closes the HTTP response, which the
server takes as a disconnect and aborts the request. `AnswerStats` measures what the user sees: TTFT from
the send to the first text, tok/s, and the inter-token gaps (one SSE chunk is one token on rtserve). The
server's `rt` object, `usage` and finish reason are kept when the server sends them; an OpenAI-compatible
server that knows nothing of `rt` is never sent one unless the user asked for a class or budget.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

RT_CLASSES = ("firm", "soft", "batch")
BUDGET_KEYS = ("ttft", "itl", "deadline")


class ChatError(Exception):
    """A request the server refused (status and message, plus Retry-After seconds when it sent one)."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


@dataclass
class AnswerStats:
    """Timing of one answer as the client saw it (monotonic seconds inside, ms in `summary`)."""

    sent_s: float
    first_s: float | None = None
    last_s: float | None = None
    num_tokens: int = 0
    gaps_s: list[float] = field(default_factory=list)
    rt: dict[str, Any] | None = None        # the server's rt report (rtserve only)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    stopped: bool = False

    def on_text(self, now_s: float) -> None:
        if self.first_s is None:
            self.first_s = now_s
        else:
            self.gaps_s.append(now_s - self.last_s)
        self.last_s = now_s
        self.num_tokens += 1

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_s is None else (self.first_s - self.sent_s) * 1000.0

    def tokens_per_s(self, now_s: float | None = None) -> float | None:
        end = self.last_s if now_s is None else now_s
        if self.first_s is None or end is None or end <= self.first_s or self.num_tokens < 2:
            return None
        return (self.num_tokens - 1) / (end - self.first_s)

    @property
    def itl_p99_ms(self) -> float | None:
        """Nearest-rank p99 of the gaps between tokens."""
        if not self.gaps_s:
            return None
        gaps = sorted(self.gaps_s)
        return gaps[min(len(gaps), max(1, math.ceil(0.99 * len(gaps)))) - 1] * 1000.0

    @property
    def verdict(self) -> str | None:
        """'met', 'missed ttft+itl' or 'dropped' from the server's rt report; None without one."""
        if not self.rt:
            return None
        if self.rt.get("dropped"):
            return "dropped"
        return "met" if self.rt.get("deadline_met") else "missed " + "+".join(self.rt.get("missed") or [])

    def footer(self, now_s: float | None = None) -> str:
        """One line: TTFT, tok/s, ITL p99, cached tokens and the budget verdict (what is known so far)."""
        def ms(v: float | None) -> str:
            return "–" if v is None else f"{v:.0f} ms"
        tps = self.tokens_per_s(now_s)
        parts = [f"TTFT {ms(self.ttft_ms)}", f"{'–' if tps is None else f'{tps:.1f}'} tok/s",
                 f"ITL p99 {ms(self.itl_p99_ms)}", f"{self.num_tokens} tokens"]
        cached = ((self.usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached:
            parts.append(f"{cached} cached")
        if self.rt:
            budget = self.rt.get("budget") or {}
            limits = ", ".join(f"{k} {budget[k + '_ms']:g} ms" for k in BUDGET_KEYS if budget.get(k + "_ms"))
            parts.append(f"{self.rt.get('class')}{' (' + limits + ')' if limits else ''}: {self.verdict}")
        if self.stopped:
            parts.append("stopped")
        elif self.finish_reason in ("length", "deadline"):
            parts.append(f"finish: {self.finish_reason}")
        return " · ".join(parts)


@dataclass
class AnswerEvent:
    text: str = ""          # new text ('' for a chunk that only carried usage/rt/finish)
    stats: AnswerStats | None = None


@dataclass
class ChatSession:
    """The conversation and its settings; `history` holds user/assistant turns (system kept apart)."""

    model: str = ""
    system: str = ""
    rt_class: str | None = None
    budgets_ms: dict[str, float] = field(default_factory=dict)  # keys from BUDGET_KEYS
    max_tokens: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def rt_object(self) -> dict[str, Any] | None:
        rt: dict[str, Any] = {} if self.rt_class is None else {"class": self.rt_class}
        rt.update({f"{k}_ms": v for k, v in self.budgets_ms.items()})
        return rt or None

    def request_body(self) -> dict[str, Any]:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.rt_object() is not None:
            body["rt"] = self.rt_object()
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def stream(self, client: httpx.Client, user_text: str) -> Iterator[AnswerEvent]:
        """Ask `user_text`; yields text as it comes. The answer (even a stopped one) joins the history;
        a refused request takes its question back out. Raises ChatError on an HTTP or in-band error."""
        self.history.append({"role": "user", "content": user_text})
        stats = AnswerStats(sent_s=time.monotonic())
        answer = ""
        try:
            with client.stream("POST", "/v1/chat/completions", json=self.request_body()) as response:
                if response.status_code != 200:
                    raise refusal(response)
                for data in sse_data(response.iter_lines()):
                    event = self._on_chunk(json.loads(data), stats)
                    answer += event.text
                    yield event
        except GeneratorExit:
            stats.stopped = True
            raise
        except ChatError:
            if not answer:
                self.history.pop()
            raise
        finally:
            if answer:
                self.history.append({"role": "assistant", "content": answer})

    @staticmethod
    def _on_chunk(chunk: dict[str, Any], stats: AnswerStats) -> AnswerEvent:
        if "error" in chunk:
            err = chunk["error"] or {}
            raise ChatError(0, str(err.get("message", err)))
        text = ""
        for choice in chunk.get("choices") or []:
            text += (choice.get("delta") or {}).get("content") or ""
            stats.finish_reason = choice.get("finish_reason") or stats.finish_reason
        if text:
            stats.on_text(time.monotonic())
        if chunk.get("usage"):
            stats.usage = chunk["usage"]
        if isinstance(chunk.get("rt"), dict):
            stats.rt = chunk["rt"]
        return AnswerEvent(text, stats)


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The `data:` payloads of an SSE stream, up to `[DONE]`."""
    for line in lines:
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield data


def refusal(response: httpx.Response) -> ChatError:
    """A non-200 answer -> ChatError with the error message and Retry-After (seconds), if any."""
    response.read()
    try:
        err = response.json().get("error") or {}
        message = err.get("message") if isinstance(err, dict) else str(err)
        code = err.get("code") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        message, code = response.text[:300], None
    retry = response.headers.get("retry-after-ms")
    retry_s = float(retry) / 1000.0 if retry else None
    if retry_s is None and response.headers.get("retry-after", "").replace(".", "", 1).isdigit():
        retry_s = float(response.headers["retry-after"])
    if code:
        message = f"{message} ({code})"
    return ChatError(response.status_code, message or f"HTTP {response.status_code}", retry_s)


def parse_budget(args: list[str]) -> dict[str, float]:
    """`ttft=300 itl=50 deadline=4000` -> {"ttft": 300.0, ...}; raises ValueError naming the bad part."""
    budgets: dict[str, float] = {}
    for arg in args:
        key, _, value = arg.partition("=")
        key = key.removesuffix("_ms")
        if key not in BUDGET_KEYS:
            raise ValueError(f"unknown budget {key!r} (use {', '.join(k + '=MS' for k in BUDGET_KEYS)})")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"{key} must be a positive number of milliseconds (got {value!r})")
        budgets[key] = number
    return budgets
