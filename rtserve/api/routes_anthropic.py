"""Anthropic-compatible routes: POST /v1/messages (streaming and not) and /v1/messages/count_tokens.

Streaming event order: message_start -> content_block_start -> ping -> content_block_delta* ->
content_block_stop -> message_delta (cumulative usage) -> message_stop; a `ping` is also sent whenever
nothing else went out for `ping_interval_s`. After the 200, errors are an `event: error`.

Real time (rtserve/api/rt_fields.py): the `rt` body field is parsed and admission runs before anything is
sent (529 overloaded_error + Retry-After on refusal); a firm stream starts only with its first delta (a drop
before it is a 504); `message_delta` carries the `rt` object, as does a non-streaming body (plus a
`Server-Timing` header). A firm stream stopped at its deadline_ms ends with stop_reason "deadline".
"""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from rtserve.api import schemas_anthropic as A
from rtserve.api.anthropic_tools import (KNOWN_MESSAGES_EXTRA, REFUSED_MESSAGES, TextBlocks, ToolUseBlocks,
                                         anthropic_tool_context, anthropic_turns, message_content)
from rtserve.api.app import AppState, app_state
from rtserve.api.errors import ApiError, anthropic_error_body, engine_failure
from rtserve.api.limits import build_sampling_params, check_request_limits, read_json_body
from rtserve.api.logging import log_fields
from rtserve.api.metrics import RequestTimer
from rtserve.api.respond import json_response, stream_response
from rtserve.api.prompts import text_of
from rtserve.api.sampling_defaults import with_defaults
from rtserve.api.rt_fields import (admit, deadline_error, is_deadline_drop, parse_rt, rt_object,
                                   server_timing)
from rtserve.api.sse import dumps, sse_event
from rtserve.api.structured_fields import ToolContext, check_grammar, load_grammar_engine, refuse_and_warn
from rtserve.api.tool_fields import render_turns, tool_format_of
from rtserve.api.streaming import (OutputStream)
from rtserve.client.outputs import RequestOutput
from rtserve.protocol import RTParams
from rtserve.sampling_params import SamplingParams

router = APIRouter()

TEXT_BLOCK_TYPES = frozenset({"text", "tool_result"})
NAMES = {"max_tokens": "max_tokens", "stop": "stop_sequences"}


@dataclass
class MessagesJob:
    message_id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_control: bool
    arrival_s: float
    rt: RTParams | None = None  # as requested; resolved by admission
    tool_ctx: ToolContext | None = None

    def blocks(self) -> TextBlocks | ToolUseBlocks:
        if self.tool_ctx is not None and self.tool_ctx.parses_tools:
            return ToolUseBlocks(self.tool_ctx.format)
        return TextBlocks()

    def start(self, state: AppState) -> OutputStream:
        iterator = state.engine.generate(self.prompt_ids, self.params, self.message_id, rt=self.rt,
                                         arrival_s=self.arrival_s, admitted=True)
        return OutputStream([iterator], [RequestTimer(state.metrics, self.arrival_s)])

    def usage(self, num_cached: int, num_output: int) -> dict[str, Any]:
        return A.usage_object(len(self.prompt_ids), num_cached, num_output, self.cache_control)


def _block_text(content: Any, param: str) -> str:
    if isinstance(content, list):
        for i, block in enumerate(content):
            if block.type == "tool_result" and block.text is None:
                block.text = block.content if isinstance(block.content, str) else "".join(
                    b.get("text", "") for b in block.content or [] if isinstance(b, dict))
    return text_of(content, param, TEXT_BLOCK_TYPES)


def prompt_ids_of(state: AppState, req: A.CountTokensRequest, ctx: ToolContext | None = None) -> list[int]:
    """The prompt; tools offered (and tool blocks in the history rendered) by rtserve/api/anthropic_tools.py."""
    if not req.messages:
        raise ApiError(400, "messages: at least one message is required.", param="messages")
    ctx = ctx if ctx is not None else anthropic_tool_context(req, tool_format_of(state))
    system = _block_text(req.system, "system") if req.system else None
    return render_turns(state.engine.tokenizer, anthropic_turns(req, system), ctx.tools, fmt=ctx.format)


async def stream_events(state: AppState, job: MessagesJob, conn: Request, outputs: OutputStream,
                        first: tuple[int, RequestOutput] | None = None) -> AsyncIterator[bytes]:
    usage = job.usage(0, 0)
    yield sse_event("message_start", A.message_start(A.message_object(job.message_id, job.model, None, None,
                                                                        None, usage)))
    blocks = job.blocks()
    for name, event in blocks.start():
        yield sse_event(name, event)
    yield sse_event("ping", A.PING)
    try:
        last = None
        while not outputs.is_done or first is not None:
            item, first = (first, None) if first is not None else (
                await outputs.get(timeout_s=state.settings.ping_interval_s), None)
            if item is None:
                if not outputs.is_done:
                    yield sse_event("ping", A.PING)
                continue
            last = item[1]
            if last.finish_reason == "error":
                raise ApiError(500, f"The engine failed this request: {last.error or 'unknown error'}")
            raise_if_cut_short(last)
            for name, event in blocks.feed(last.text):
                yield sse_event(name, event)
        if last is None:
            raise ApiError(500, "The engine ended the request without output.")
        for name, event in blocks.close():
            yield sse_event(name, event)
        stop_reason, stop_sequence = A.stop_reason_of(last.finish_reason, last.stop_reason)
        stop_reason = blocks.stop_reason(stop_reason)
        usage = job.usage(last.num_cached_tokens, last.num_output_tokens)
        log_fields(conn, stop_reason=stop_reason, **usage)
        delta = A.message_delta(stop_reason, stop_sequence, usage)
        yield sse_event("message_delta", {**delta, "rt": last.rt.to_wire()} if last.rt is not None else delta)
        yield sse_event("message_stop", A.MESSAGE_STOP)
    except Exception as exc:  # after the 200: the error goes in-band
        err = exc if isinstance(exc, ApiError) else engine_failure(exc, state.engine.is_dead)
        log_fields(conn, error=err.message)
        yield sse_event("error", anthropic_error_body(err))
    finally:
        await outputs.aclose()


def raise_if_cut_short(out: RequestOutput) -> None:
    """An abort by the server (shutdown, slow reader) has no Anthropic stop_reason: it is a 503 error."""
    if out.finish_reason == "abort" and out.error:
        raise ApiError(503, f"The response was cut short: {out.error}.")


async def collect(state: AppState, job: MessagesJob) -> dict[str, Any]:
    text, last = "", None
    async with job.start(state) as outputs:
        async for _, out in outputs:
            text += out.text
            last = out
    if last is None or last.finish_reason == "error":
        raise ApiError(500, f"The engine failed this request: {last.error if last else 'no output'}")
    raise_if_cut_short(last)
    if job.rt is not None and job.rt.rt_class == "firm" and is_deadline_drop(last):
        raise deadline_error(last.error)
    stop_reason, stop_sequence = A.stop_reason_of(last.finish_reason, last.stop_reason)
    body = A.message_object(job.message_id, job.model, text, stop_reason, stop_sequence,
                            job.usage(last.num_cached_tokens, last.num_output_tokens))
    if job.tool_ctx is not None and job.tool_ctx.parses_tools:
        body["content"], body["stop_reason"] = message_content(text, stop_reason, job.tool_ctx.format)
    rt = rt_object([last.rt])
    return body if rt is None else {**body, "rt": rt, "_server_timing": server_timing([last.rt])}


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    arrival_s, state = time.monotonic(), app_state(request)
    req = await read_json_body(request, A.MessagesRequest)
    refuse_and_warn(req.model_extra or {}, REFUSED_MESSAGES, KNOWN_MESSAGES_EXTRA)
    if req.tools:
        await load_grammar_engine({"tools": req.tools})
    tool_ctx = anthropic_tool_context(req, tool_format_of(state))
    sampling = with_defaults(state.settings.sampling_defaults, temperature=req.temperature, top_p=req.top_p,
                             top_k=req.top_k, min_p=None, repetition_penalty=None)
    params = build_sampling_params(NAMES, max_tokens=req.max_tokens, **sampling, stop=req.stop_sequences or [],
                                   structured=tool_ctx.structured)
    check_grammar(tool_ctx.structured, "tools")
    prompt_ids = prompt_ids_of(state, req, tool_ctx)
    check_request_limits(state.engine, prompt_ids, params, prompt_param="messages", param_names=NAMES)
    rt = parse_rt((req.model_extra or {}).get("rt"))
    job = MessagesJob(f"msg_{uuid.uuid4().hex}", req.model or state.model_name, prompt_ids, params,
                      A.has_cache_control(req), arrival_s, tool_ctx=tool_ctx)
    log_fields(request, id=job.message_id, model=job.model, stream=bool(req.stream))
    if state.engine.is_dead:
        raise ApiError(503, "The engine is not running.")
    job.rt = admit(state.engine, len(prompt_ids), rt, arrival_s, anthropic=True)
    if req.stream:
        return await stream_response(request, state, job.rt, job.start(state),
                                     lambda outputs, first: stream_events(state, job, request, outputs, first))
    return await json_response(request, state, collect(state, job))


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    state = app_state(request)
    req = await read_json_body(request, A.CountTokensRequest)
    ids = prompt_ids_of(state, req)
    return Response(dumps({"input_tokens": len(ids)}).encode(), media_type="application/json")
