"""Request-body size limit as pure ASGI middleware (413 before the route ever parses anything).

Checks Content-Length up front and counts the streamed body too (chunked uploads have no Content-Length).
When the body goes over the limit mid-stream, `receive` raises `RequestTooLarge`, which the app's error
handler turns into a 413 in the route family's shape.

Also: parsing a JSON body into a request model (400s, never 422/500) and the per-request caps (n,
max_tokens, logprobs, prompt length), each failing as a 400 whose `param` names the request field.
"""
from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rtserve.api.errors import ApiError, RequestTooLarge, error_body, from_validation_errors, param_from_message
from rtserve.api.sse import dumps
from rtserve.sampling_params import SamplingParams

M = TypeVar("M", bound=BaseModel)


class BodyLimitMiddleware:
    """`path_limits` gives paths (exact) their own limit, e.g. file uploads larger than any request body."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.path_limits.get(scope.get("path", ""), self.max_body_bytes)
        if scope["type"] != "http" or limit <= 0:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope.get("headers", []))
        if declared is not None and declared > limit:
            await _send_413(scope, send, limit)
            return
        num_received = 0

        async def counting_receive() -> Message:
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > limit:
                    raise RequestTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(scope: Scope, send: Send, limit: int) -> None:
    body = dumps(error_body(scope["path"], RequestTooLarge(limit))).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def read_json_body(request: Request, model: type[M]) -> M:
    """Body -> pydantic model, with every failure a 400 naming what is wrong (never a 422 or a 500).

    Checks, in order: the size limit (while streaming, via BodyLimitMiddleware), strict UTF-8, JSON syntax,
    a top-level object, then the model's field types.
    """
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"The request body is not valid UTF-8 (byte {exc.start}).", code="invalid_encoding")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc.msg} at position {exc.pos}.",
                       code="invalid_json")
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors(include_url=False, include_input=False)))


def build_sampling_params(param_names: dict[str, str], **fields: Any) -> SamplingParams:
    """SamplingParams(**fields) with its ValueError turned into a 400 naming the client's field.

    `param_names` maps SamplingParams field names to the request's names (e.g. max_tokens ->
    max_completion_tokens, logprobs -> top_logprobs).
    """
    try:
        return SamplingParams(**fields)
    except (ValueError, TypeError) as exc:
        param = param_from_message(str(exc))
        raise ApiError(400, _rename(str(exc), param, param_names), param=param_names.get(param, param),
                       code="invalid_value")


def check_request_limits(engine: Any, prompt_ids: list[int], params: SamplingParams, *,
                         prompt_param: str, param_names: dict[str, str]) -> None:
    """Caps on n, max_tokens, logprobs and prompt length (400 naming the field), then the engine's own check."""
    limits = engine.limits
    max_tokens_param = param_names.get("max_tokens", "max_tokens")
    if params.n > limits.max_n:
        raise ApiError(400, f"n must be <= {limits.max_n}, got {params.n}.", param="n", code="invalid_value")
    if params.max_tokens is not None and params.max_tokens > limits.max_tokens_cap:
        raise ApiError(400, f"{max_tokens_param} must be <= {limits.max_tokens_cap}, got {params.max_tokens}.",
                       param=max_tokens_param, code="invalid_value")
    if params.logprobs is not None and params.logprobs > limits.max_logprobs:
        name = param_names.get("logprobs", "logprobs")
        raise ApiError(400, f"{name} must be <= {limits.max_logprobs}, got {params.logprobs}.", param=name,
                       code="invalid_value")
    if not prompt_ids:
        raise ApiError(400, f"The prompt ({prompt_param}) is empty.", param=prompt_param, code="invalid_value")
    if len(prompt_ids) >= engine.max_model_len:
        raise ApiError(400, f"The prompt ({prompt_param}) has {len(prompt_ids)} tokens; this model's maximum "
                       f"context length is {engine.max_model_len} tokens.", param=prompt_param,
                       code="context_length_exceeded")
    if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > engine.max_model_len:
        raise ApiError(400, f"The prompt ({len(prompt_ids)} tokens) plus {max_tokens_param} ({params.max_tokens}) "
                       f"exceeds the maximum context length of {engine.max_model_len} tokens.",
                       param=max_tokens_param, code="context_length_exceeded")
    try:
        engine.validate(prompt_ids, params)
    except ValueError as exc:  # the engine's InvalidRequest carries `.param`
        param = getattr(exc, "param", None) or param_from_message(str(exc))
        if param in ("prompt", "prompt_token_ids", "input", "prompt_len"):
            param = prompt_param
        raise ApiError(400, str(exc), param=param_names.get(param, param) if param else None, code="invalid_value")


def _rename(message: str, param: str | None, param_names: dict[str, str]) -> str:
    if param and param in param_names:
        return param_names[param] + message[len(param):]
    return message
