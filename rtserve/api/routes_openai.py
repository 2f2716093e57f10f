"""OpenAI-compatible routes: POST /v1/chat/completions and /v1/completions, streaming and not.

A request with n choices (and, for completions, several prompts) fans out into one engine request per
choice, with ids `{id}-{i}`. Streaming: the role chunk goes out with the first token (never at admission),
`finish_reason` rides on the last content chunk, the usage chunk (`choices: []`) precedes `data: [DONE]`,
and an error after the 200 is sent in-band as `data: {"error": ...}` followed by `[DONE]`.

Real time (rtserve/api/rt_fields.py): `rt` / `service_tier` are parsed and admission runs before anything is
sent (429 + Retry-After on refusal); a firm stream starts only with its first delta (a drop before it is a
504); the last chunk before `[DONE]` carries the `rt` object (merged into the usage chunk when there is
one); a non-streaming body carries `rt` and the response a `Server-Timing` header.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from rtserve.api import schemas_openai as S
from rtserve.api.app import AppState, app_state
from rtserve.api.errors import ApiError, engine_failure, openai_error_body
from rtserve.api.limits import build_sampling_params, check_request_limits, read_json_body
from rtserve.api.logging import log_fields
from rtserve.api.metrics import RequestTimer
from rtserve.api.respond import json_response, stream_response
from rtserve.api.prompts import chat_prompt_ids, completion_prompt_ids
from rtserve.api.sampling_defaults import with_defaults
from rtserve.api.rt_fields import (admit, deadline_error, is_deadline_drop, parse_rt, rt_object,
                                   server_timing)
from rtserve.api.sse import SSE_DONE, sse_data
from rtserve.api.structured_fields import (REFUSED_CHAT, REFUSED_COMPLETION, ToolContext, check_grammar,
                                           completion_structured, grammar_param, load_grammar_engine,
                                           openai_tool_context, prediction_ids, prediction_usage, refuse_and_warn,
                                           sampling_extras)
from rtserve.api.tool_fields import needs_tool_rendering, openai_turns, render_turns, tool_format_of
from rtserve.api.tool_responses import ChoiceTools, message_fields
from rtserve.api.streaming import (OutputStream)
from rtserve.client.outputs import RequestOutput
from rtserve.protocol import RTParams
from rtserve.sampling_params import SamplingParams

router = APIRouter()


@dataclass
class Job:
    """One OpenAI request after validation: what to generate and how to report it."""

    kind: str  # "chat" | "completion"
    request_id: str
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    arrival_s: float
    include_usage: bool = False
    continuous_usage: bool = False
    echo_texts: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    rt: RTParams | None = None  # as requested; resolved by admission in `respond`
    tool_ctx: ToolContext | None = None  # chat with tools: tool calls are read out of the text
    choice_tools: list[ChoiceTools] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tool_ctx is not None and self.tool_ctx.parses_tools:
            self.choice_tools = [ChoiceTools(self.tool_ctx.format) for _ in range(self.num_choices)]

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice // self.params.n]


def start_outputs(state: AppState, job: Job) -> OutputStream:
    """Submit one engine request per choice; seeds differ per choice so n samples are not identical."""
    iterators, timers = [], []
    for choice in range(job.num_choices):
        i = choice % job.params.n
        seed = None if job.params.seed is None else job.params.seed + i
        params = dataclasses.replace(job.params, n=1, seed=seed)
        iterators.append(state.engine.generate(job.prompt_of(choice), params, f"{job.request_id}-{choice}",
                                               rt=job.rt, arrival_s=job.arrival_s, admitted=True))
        timers.append(RequestTimer(state.metrics, job.arrival_s))
    return OutputStream(iterators, timers)


def finish_reason_of(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    if out.finish_reason == "error":
        raise ApiError(500, f"The engine failed this request: {out.error or 'unknown error'}", code="engine_error")
    return out.finish_reason or "stop"


class UsageTally:
    """Per-choice token counts; the prompt is counted once per prompt, as OpenAI does for n > 1."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.num_output = [0] * job.num_choices
        self.num_cached = [0] * len(job.prompts)
        self.output_ids: list[list[int]] = [[] for _ in range(job.num_choices)]  # with a prediction only

    def update(self, choice: int, out: RequestOutput) -> None:
        self.num_output[choice] = max(self.num_output[choice], out.num_output_tokens)
        p = choice // self.job.params.n
        self.num_cached[p] = max(self.num_cached[p], out.num_cached_tokens)
        if self.job.params.prediction:
            self.output_ids[choice] += out.token_ids

    def total(self) -> dict[str, Any]:
        usage = S.usage_object(sum(map(len, self.job.prompts)), sum(self.num_output), sum(self.num_cached))
        if self.job.params.prediction:
            usage["completion_tokens_details"] = prediction_usage(self.job.params.prediction, self.output_ids)
        return usage

    def of_choice(self, choice: int) -> dict[str, Any]:
        p = choice // self.job.params.n
        return S.usage_object(len(self.job.prompts[p]), self.num_output[choice], self.num_cached[p])


def chunk_choice(job: Job, tokenizer: Any, choice: int, out: RequestOutput, is_first: bool,
                 text_offsets: list[int]) -> dict[str, Any] | None:
    """The choice object for one delta, or None when the delta carries nothing to send."""
    finish = finish_reason_of(out)
    text = (job.echo_texts[choice // job.params.n] if is_first and job.echo_texts else "") + out.text
    if job.kind == "chat":
        logprobs = S.chat_logprobs(tokenizer, out.logprobs) if job.params.logprobs is not None else None
        if job.choice_tools:
            return _tool_chunk_choice(job.choice_tools[choice], choice, out, is_first, logprobs, finish)
        if not (is_first or text or logprobs or finish):
            return None
        delta = {"role": "assistant", "content": text} if is_first else ({"content": text} if text else {})
        return S.chat_chunk_choice(choice, delta, logprobs, finish)
    logprobs = None
    if job.params.logprobs is not None:
        logprobs = S.completion_logprobs(tokenizer, out.logprobs or [], text_offsets[choice])
    if not (text or finish or (logprobs and logprobs["tokens"])):
        return None
    text_offsets[choice] += len(text)
    return S.completion_choice(choice, text, logprobs, finish)


def _tool_chunk_choice(tools: ChoiceTools, choice: int, out: RequestOutput, is_first: bool,
                      logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any] | None:
    fields = tools.delta(out.text, out.finished)
    finish = tools.finish_reason(finish)
    if not (is_first or fields or logprobs or finish):
        return None
    delta = {"role": "assistant", "content": fields.pop("content", None if "tool_calls" in fields else "")
             } if is_first else {}
    return S.chat_chunk_choice(choice, {**delta, **fields}, logprobs, finish)


async def _replay(first: tuple[int, RequestOutput] | None, outputs: OutputStream):
    if first is not None:
        yield first
    async for item in outputs:
        yield item


async def stream_events(state: AppState, job: Job, conn: Request, outputs: OutputStream,
                        first: tuple[int, RequestOutput] | None = None) -> AsyncIterator[bytes]:
    make_chunk = S.chat_chunk if job.kind == "chat" else S.completion_chunk
    tokenizer, usage = state.engine.tokenizer, UsageTally(job)
    started: set[int] = set()
    text_offsets = [0] * job.num_choices
    reports = [None] * job.num_choices
    try:
        async for choice, out in _replay(first, outputs):
            usage.update(choice, out)
            if out.finished:
                reports[choice] = out.rt
            body = chunk_choice(job, tokenizer, choice, out, choice not in started, text_offsets)
            if body is None:
                continue
            started.add(choice)
            chunk_usage = usage.of_choice(choice) if job.continuous_usage else None
            yield sse_data(make_chunk(job.request_id, job.created, job.model, [body], chunk_usage,
                                      with_usage_key=job.include_usage))
        rt = rt_object(reports)
        if job.include_usage or rt is not None:
            final = make_chunk(job.request_id, job.created, job.model, [],
                               usage.total() if job.include_usage else None)
            yield sse_data({**final, "rt": rt} if rt is not None else final)
        log_fields(conn, **usage.total())
    except Exception as exc:  # after the 200: the error goes in-band
        err = exc if isinstance(exc, ApiError) else engine_failure(exc, state.engine.is_dead)
        log_fields(conn, error=err.message)
        yield sse_data(openai_error_body(err))
    finally:
        await outputs.aclose()
    yield SSE_DONE


async def collect(state: AppState, job: Job) -> dict[str, Any]:
    """Run every choice to completion and build the non-streaming response object."""
    tokenizer, usage = state.engine.tokenizer, UsageTally(job)
    texts = list(job.echo_texts[c // job.params.n] if job.echo_texts else "" for c in range(job.num_choices))
    logprobs: list[list] = [[] for _ in range(job.num_choices)]
    finish: list[str | None] = [None] * job.num_choices
    reports = [None] * job.num_choices
    async with start_outputs(state, job) as outputs:
        async for choice, out in outputs:
            if job.rt is not None and job.rt.rt_class == "firm" and is_deadline_drop(out):
                raise deadline_error(out.error)
            usage.update(choice, out)
            texts[choice] += out.text
            logprobs[choice] += out.logprobs or []
            finish[choice] = finish_reason_of(out)
            if out.finished:
                reports[choice] = out.rt
    want_lp = job.params.logprobs is not None
    if job.kind == "chat":
        choices = [S.chat_choice(c, texts[c], S.chat_logprobs(tokenizer, logprobs[c]) if want_lp else None,
                                 finish[c]) for c in range(job.num_choices)]
        if job.choice_tools:
            for c, body in enumerate(choices):
                fields, body["finish_reason"] = message_fields(texts[c], finish[c], job.tool_ctx.format)
                body["message"].update(fields)
        body = S.chat_completion(job.request_id, job.created, job.model, choices, usage.total())
    else:
        choices = [S.completion_choice(c, texts[c], S.completion_logprobs(tokenizer, logprobs[c], 0) if want_lp
                                       else None, finish[c]) for c in range(job.num_choices)]
        body = {**S.completion_chunk(job.request_id, job.created, job.model, choices), "usage": usage.total()}
    rt = rt_object(reports)
    return body if rt is None else {**body, "rt": rt, "_server_timing": server_timing(reports)}


async def respond(request: Request, state: AppState, job: Job, stream: bool) -> Response:
    log_fields(request, id=job.request_id, model=job.model, n=job.num_choices, stream=stream)
    if state.engine.is_dead:
        raise ApiError(503, "The engine is not running.", code="engine_dead")
    job.rt = admit(state.engine, sum(map(len, job.prompts)) * job.params.n, job.rt, job.arrival_s)
    log_fields(request, rt_class=job.rt.rt_class)
    if stream:
        return await stream_response(request, state, job.rt, start_outputs(state, job),
                                     lambda outputs, first: stream_events(state, job, request, outputs, first))
    return await json_response(request, state, collect(state, job))


def _params(state: AppState, req: S._SamplingFields, names: dict[str, str], max_tokens: int | None,
            logprobs: int | None, **extras: Any) -> SamplingParams:
    sampling = with_defaults(state.settings.sampling_defaults, temperature=req.temperature, top_p=req.top_p,
                             top_k=req.top_k, min_p=req.min_p,
                             repetition_penalty=extras.pop("repetition_penalty", None))
    return build_sampling_params(
        names, n=1 if req.n is None else req.n, max_tokens=max_tokens, **sampling, seed=req.seed, stop=req.stop or [], stop_token_ids=req.stop_token_ids or [],
        ignore_eos=bool(req.ignore_eos), min_tokens=req.min_tokens or 0, logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens is not False,
        include_stop_str_in_output=bool(req.include_stop_str_in_output), **extras)


def _rt_of(req: S._SamplingFields) -> RTParams | None:
    """The `rt` extension and OpenAI's `service_tier` (extra fields of the request body)."""
    extra = req.model_extra or {}
    return parse_rt(extra.get("rt"), extra.get("service_tier"))


def _stream_flags(req: S._SamplingFields) -> tuple[bool, bool]:
    opts = req.stream_options
    return bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats)


def chat_job(state: AppState, req: S.ChatCompletionRequest, arrival_s: float) -> Job:
    """A validated chat request -> Job (400/404 ApiError on bad input); nothing is submitted."""
    model = state.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
    use_mct = req.max_completion_tokens is not None
    names = {"max_tokens": "max_completion_tokens" if use_mct else "max_tokens", "logprobs": "top_logprobs"}
    extra = req.model_extra or {}
    refuse_and_warn(extra, REFUSED_CHAT)
    tool_ctx = openai_tool_context(extra, tool_format_of(state))
    params = _params(state, req, names, req.max_completion_tokens if use_mct else req.max_tokens,
                     (req.top_logprobs or 0) if req.logprobs else None, structured=tool_ctx.structured,
                     prediction=prediction_ids(extra, state.engine.tokenizer, state.engine.max_model_len),
                     **sampling_extras(extra))
    check_grammar(tool_ctx.structured, grammar_param(extra, tool_ctx))
    if tool_ctx.tools or needs_tool_rendering(req.messages):
        prompt_ids = render_turns(state.engine.tokenizer, openai_turns(req.messages), tool_ctx.tools,
                                  fmt=tool_ctx.format)
    else:
        prompt_ids = chat_prompt_ids(state.engine.tokenizer, req.messages)
    check_request_limits(state.engine, prompt_ids, params, prompt_param="messages", param_names=names)
    include_usage, continuous = _stream_flags(req)
    return Job("chat", f"chatcmpl-{uuid.uuid4().hex}", model, [prompt_ids], params, arrival_s,
               include_usage, continuous, rt=_rt_of(req), tool_ctx=tool_ctx)


def completion_job(state: AppState, req: S.CompletionRequest, arrival_s: float) -> Job:
    """A validated completions request -> Job (400/404 ApiError on bad input); nothing is submitted."""
    model = state.check_model(req.model)
    extra = req.model_extra or {}
    refuse_and_warn(extra, REFUSED_COMPLETION)
    structured, grammar_field = completion_structured(extra)
    params = _params(state, req, {}, req.max_tokens, req.logprobs, structured=structured, **sampling_extras(extra))
    check_grammar(structured, grammar_field)
    prompts = completion_prompt_ids(state.engine.tokenizer, req.prompt, req.parse_special_tokens is not False)
    if len(prompts) * params.n > state.engine.limits.max_n:
        raise ApiError(400, f"len(prompt) * n must be <= {state.engine.limits.max_n}.", param="prompt")
    for prompt_ids in prompts:
        check_request_limits(state.engine, prompt_ids, params, prompt_param="prompt", param_names={})
    echo = [state.engine.tokenizer.decode(p) for p in prompts] if req.echo else []
    include_usage, continuous = _stream_flags(req)
    return Job("completion", f"cmpl-{uuid.uuid4().hex}", model, prompts, params, arrival_s, include_usage,
               continuous, echo, rt=_rt_of(req))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    arrival_s, state = time.monotonic(), app_state(request)
    req = await read_json_body(request, S.ChatCompletionRequest)
    await load_grammar_engine(req.model_extra)
    return await respond(request, state, chat_job(state, req, arrival_s), bool(req.stream))


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    arrival_s, state = time.monotonic(), app_state(request)
    req = await read_json_body(request, S.CompletionRequest)
    await load_grammar_engine(req.model_extra)
    return await respond(request, state, completion_job(state, req, arrival_s), bool(req.stream))
