"""One streamed request -> one `RequestRecord`, plus target discovery (`GET /v1/models`).

Per request the client builds one JSON body and, per received piece of the stream, takes one
`time.perf_counter()` and hands the complete `data:` payloads to `StreamState.on_payload`.
Times inside a record are seconds; `send_s`/`arrival_s` count from the phase start, every other
time from the moment the request was sent.
"""
from __future__ import annotations

import asyncio
import email.utils
import math
import time
from dataclasses import dataclass, field

import httpx

from rtserve.bench.sse import SseSplitter, StreamState
from rtserve.bench.workloads import RequestSpec

REJECT_STATUSES = (429, 503, 529)  # overload answers: counted as rejections, never retried


class RequestStatus:
    PENDING = "pending"
    OK = "ok"
    REJECTED = "rejected"  # HTTP 429/503/529 before the stream started
    ERROR = "error"  # any other HTTP status, transport failure or a mid-stream error
    DROPPED = "dropped"  # stopped by the server for a deadline: finish_reason "deadline", or a 504
    #                      deadline_exceeded before the first token (rtserve's firm class)
    CANCELLED = "cancelled"  # still in flight when --duration-s ran out


@dataclass
class RequestRecord:
    """Everything measured about one request (the unit `metrics` works on)."""

    index: int
    rt_class: str
    input_len_est: int
    max_tokens: int
    arrival_s: float  # scheduled arrival, from the phase start
    rt_budget: dict | None = None  # the class budget (wire form), whether or not it was sent
    rt_sent: bool = False
    send_s: float = math.nan  # when it was actually sent (after any --max-concurrency wait)
    status: str = RequestStatus.PENDING
    http_status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None  # to the last chunk with choices (or to the end of the stream)
    finished_s: float | None = None  # when the client was done with it (stream closed, cancelled)
    chunk_times_s: list[float] = field(default_factory=list)  # one per chunk with choices
    # One per chunk carrying text: judging deadlines on tokens, a stream cut off for a deadline ends
    # with a finish chunk that is a notice, not a token served late.
    content_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    output_tokens_from_usage: bool = False
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    server_rt: dict | None = None
    finish_reason: str | None = None

    @classmethod
    def for_spec(cls, spec: RequestSpec, arrival_s: float) -> RequestRecord:
        budget = spec.rt.to_wire() if spec.rt is not None else None
        return cls(spec.index, spec.rt_class, spec.input_len_est, spec.max_tokens, arrival_s, budget)

    @property
    def is_ok(self) -> bool:
        return self.status == RequestStatus.OK

    @property
    def itl_s(self) -> list[float]:
        times = self.chunk_times_s
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def tpot_s(self) -> float | None:
        """vLLM's per-request TPOT, (e2e - ttft) / (n - 1): excludes the first token; None if n <= 1."""
        if not self.is_ok or self.output_tokens <= 1 or self.e2e_s is None or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def end_s(self) -> float:
        """When the client was done with it, from the phase start (nan if never sent)."""
        return self.send_s + (self.finished_s if self.finished_s is not None else math.nan)


@dataclass(frozen=True)
class Target:
    """Where and how to send: the resolved model and whether to attach the `rt` extension."""

    url: str
    model: str
    owned_by: str | None
    rt_extension: bool
    headers: dict[str, str]


async def discover_model(http: httpx.AsyncClient, base_url: str, headers: dict[str, str],
                         model: str | None) -> tuple[str, str | None]:
    """(model id, owned_by) from GET /v1/models; the first id unless `model` is given."""
    try:
        resp = await http.get(f"{base_url}/v1/models", headers=headers)
        resp.raise_for_status()
        cards = resp.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        if model is None:
            raise
        return model, None
    if model is None:
        if not cards:
            raise ValueError(f"{base_url}/v1/models lists no models; pass --model")
        return cards[0]["id"], cards[0].get("owned_by")
    owned = [c.get("owned_by") for c in cards if c.get("id") == model]
    return model, owned[0] if owned else (cards[0].get("owned_by") if cards else None)


def build_body(spec: RequestSpec, target: Target, endpoint: str, ignore_eos: bool,
               extra_body: dict) -> dict:
    body: dict = {"model": target.model, "max_tokens": spec.max_tokens, "stream": True,
                  "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = list(spec.messages)
    else:
        body["prompt"] = spec.prompt
    if ignore_eos:
        body["ignore_eos"] = True
    if target.rt_extension and spec.rt is not None:
        body["rt"] = spec.rt.to_wire()
    body.update(extra_body)
    return body


def parse_retry_after_s(headers: httpx.Headers) -> float | None:
    """`retry-after-ms`, else `retry-after` (seconds or an HTTP date); recorded, never acted on."""
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000.0
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (ValueError, TypeError):
        return None


async def send_request(http: httpx.AsyncClient, target: Target, body: dict,
                       record: RequestRecord, phase_start_s: float) -> None:
    """Stream one request and fill `record` in place (also when cancelled, before re-raising)."""
    sent_at = time.perf_counter()
    record.send_s = sent_at - phase_start_s
    record.rt_sent = "rt" in body
    state = StreamState()
    try:
        async with http.stream("POST", target.url, json=body, headers=target.headers) as resp:
            record.http_status = resp.status_code
            if resp.status_code != 200:
                await _record_http_failure(resp, record)
                _fill_timings(record, state, sent_at, time.perf_counter())
                return
            splitter = SseSplitter()
            async for text in resp.aiter_text():
                now_s = time.perf_counter()
                for payload in splitter.feed(text):
                    state.on_payload(payload, now_s)
                if state.done or state.error:
                    break
        _finish(record, state, sent_at, time.perf_counter())
    except asyncio.CancelledError:
        record.status = RequestStatus.CANCELLED
        _fill_timings(record, state, sent_at, time.perf_counter())
        raise
    except Exception as exc:  # a transport failure or a bug: recorded, never fatal to the run
        record.status = RequestStatus.ERROR
        record.error = f"{type(exc).__name__}: {exc}"
        _fill_timings(record, state, sent_at, time.perf_counter())


async def _record_http_failure(resp: httpx.Response, record: RequestRecord) -> None:
    body = (await resp.aread())[:300].decode("utf-8", errors="replace")
    record.status = RequestStatus.REJECTED if resp.status_code in REJECT_STATUSES else RequestStatus.ERROR
    if resp.status_code == 504 and "deadline_exceeded" in body:
        record.status = RequestStatus.DROPPED
    record.retry_after_s = parse_retry_after_s(resp.headers)
    record.error = f"HTTP {resp.status_code}: {body}"


def _finish(record: RequestRecord, state: StreamState, sent_at: float, ended_at: float) -> None:
    if state.error:
        record.status, record.error = RequestStatus.ERROR, state.error
    elif state.finish_reason == "deadline":  # a partial answer, cut off by the server: not a completion
        record.status, record.error = RequestStatus.DROPPED, "stopped by the server for a deadline"
    elif not state.chunk_times_s:
        record.status, record.error = RequestStatus.ERROR, "stream ended without a token chunk"
    else:
        record.status = RequestStatus.OK
    _fill_timings(record, state, sent_at, ended_at)


def _fill_timings(record: RequestRecord, state: StreamState, sent_at: float, ended_at: float) -> None:
    record.chunk_times_s = [t - sent_at for t in state.chunk_times_s]
    record.content_times_s = [t - sent_at for t in state.content_times_s]
    record.ttft_s = record.chunk_times_s[0] if record.chunk_times_s else None
    record.e2e_s = record.chunk_times_s[-1] if record.chunk_times_s else ended_at - sent_at
    record.finished_s = ended_at - sent_at
    record.output_tokens_from_usage = state.completion_tokens is not None
    record.output_tokens = state.completion_tokens if state.completion_tokens is not None \
        else state.num_content_chunks
    record.prompt_tokens = state.prompt_tokens
    record.cached_tokens = state.cached_tokens
    record.server_rt = state.server_rt
    record.finish_reason = state.finish_reason
