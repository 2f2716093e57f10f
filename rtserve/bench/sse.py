"""Minimal parsing of OpenAI-style server-sent-event streams, kept cheap because it runs per chunk.

Framing (wire-conventions §1.2): events are separated by a blank line; `data:` lines carry JSON or
`[DONE]`; lines starting with `:` are comments (keep-alives). CRLF is tolerated. A payload with an
`error` key is a mid-stream error. Timing follows `vllm bench serve`: a chunk counts (for TTFT and
ITL) when its `choices` is non-empty; the usage chunk (`choices: []`) carries no token.
"""
from __future__ import annotations

import json


class SseSplitter:
    """Feeds text pieces in, returns the `data:` payloads of the events completed so far."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, text: str) -> list[str]:
        buf = self._buf + text
        if "\r" in buf:
            buf = buf.replace("\r\n", "\n")
        *events, self._buf = buf.split("\n\n")
        payloads = []
        for event in events:
            if event.startswith("data:") and "\n" not in event:  # the common one-line case
                payloads.append(event[6:] if event.startswith("data: ") else event[5:])
                continue
            data = [line[5:].removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
            if data:
                payloads.append("\n".join(data))
        return payloads


class StreamState:
    """What one stream has produced so far; `on_payload` is the only per-chunk work."""

    __slots__ = ("chunk_times_s", "content_times_s", "num_content_chunks", "completion_tokens", "prompt_tokens",
                 "cached_tokens", "server_rt", "finish_reason", "error", "done")

    def __init__(self) -> None:
        self.chunk_times_s: list[float] = []  # perf_counter() of each chunk with non-empty choices
        self.content_times_s: list[float] = []  # ... of each chunk that carries text (a finish chunk does not)
        self.num_content_chunks = 0  # chunks whose delta.content / text is non-empty
        self.completion_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.server_rt: dict | None = None
        self.finish_reason: str | None = None  # of the first choice, once given
        self.error: str | None = None
        self.done = False

    def on_payload(self, payload: str, now_s: float) -> None:
        if payload == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            self.error = f"malformed SSE payload: {payload[:200]!r}"
            return
        if not isinstance(obj, dict):
            self.error = f"unexpected SSE payload: {payload[:200]!r}"
            return
        if "error" in obj and obj["error"]:
            err = obj["error"]
            self.error = "stream error: " + str(err.get("message", err) if isinstance(err, dict) else err)
            return
        choices = obj.get("choices")
        if choices:
            self.chunk_times_s.append(now_s)
            choice = choices[0]
            delta = choice.get("delta")
            if (delta.get("content") if delta else choice.get("text")):
                self.num_content_chunks += 1
                self.content_times_s.append(now_s)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        usage = obj.get("usage")
        if usage:
            self._on_usage(usage)
        if "rt" in obj:
            self.server_rt = obj["rt"]

    def _on_usage(self, usage: dict) -> None:
        self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)
        self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
        details = usage.get("prompt_tokens_details") or {}
        self.cached_tokens = details.get("cached_tokens", self.cached_tokens)
