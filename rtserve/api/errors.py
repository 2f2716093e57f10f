"""API errors and their two wire shapes (OpenAI and Anthropic), chosen by route.

OpenAI:    {"error": {"message", "type", "param", "code"}}   (all four keys always present)
Anthropic: {"type": "error", "error": {"type", "message"}}
Handlers raise `ApiError`; FastAPI/pydantic/Starlette errors are converted here so that clients never see a
422 or an HTML/plain-text error body.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from rtserve.api.sse import dumps

logger = logging.getLogger("rtserve.api")

MAX_MESSAGE_CHARS = 500  # never echo unbounded user bytes back

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 431: "invalid_request_error", 499: "client_closed_request",
                500: "server_error", 503: "server_error", 529: "server_error"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error", 500: "api_error", 503: "api_error", 529: "overloaded_error"}


class ApiError(Exception):
    """A request failure with an HTTP status; `param` names the offending request field (OpenAI)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message[:MAX_MESSAGE_CHARS]
        self.param = param
        self.code = code
        self.headers = headers or {}


class RequestTooLarge(ApiError):
    """The body is over --max-body-bytes (raised while the body streams in)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body is larger than the limit of {limit} bytes.",
                         code="request_too_large")


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def openai_error_body(err: ApiError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": OPENAI_TYPES.get(err.status, "server_error"),
                      "param": err.param, "code": err.code}}


def anthropic_error_body(err: ApiError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(err.status, "api_error"),
                                       "message": err.message}}


def error_body(path: str, err: ApiError) -> dict[str, Any]:
    return anthropic_error_body(err) if is_anthropic_path(path) else openai_error_body(err)


def error_response(path: str, err: ApiError) -> Response:
    return Response(dumps(error_body(path, err)).encode(), status_code=err.status,
                    media_type="application/json", headers=err.headers)


def validation_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """`("messages", 0, "content", "str")` -> `"messages[0].content"` (pydantic union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part.islower() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
        elif part == "body":
            continue
        else:
            break
    return out or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def from_validation_errors(errors: list[dict[str, Any]]) -> ApiError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = validation_param(tuple(first.get("loc", ())))
    where = f"'{param}': " if param else ""
    return ApiError(400, f"{where}{first.get('msg', 'invalid value')}", param=param, code="invalid_value")


def engine_failure(exc: BaseException, is_dead: bool) -> ApiError:
    """Map an engine-side exception to an API error: bad input 400, dead engine 503, anything else 500."""
    if isinstance(exc, ValueError):
        param = getattr(exc, "param", None) or param_from_message(str(exc))
        return ApiError(400, str(exc), param=param, code="invalid_value")
    if is_dead or type(exc).__name__ == "EngineDeadError":
        return ApiError(503, f"The engine is not running ({type(exc).__name__}: {exc}).", code="engine_dead")
    return ApiError(500, f"The engine failed this request ({type(exc).__name__}: {exc}).", code="engine_error")


def param_from_message(message: str) -> str | None:
    """`"max_tokens must be <= 4096"` -> `"max_tokens"`: validators name the field first."""
    head = message.split(" ", 1)[0].strip(":'\"`,")
    return head if head.replace("_", "").isalnum() and head.islower() else None


def install_error_handlers(app: FastAPI) -> None:
    """Map every error FastAPI/Starlette can raise onto the route family's error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request.url.path, from_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: "Not found.", 405: "Method not allowed."}.get(exc.status_code, str(exc.detail))
        err = ApiError(exc.status_code, message, headers=dict(exc.headers or {}))
        return error_response(request.url.path, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, ApiError(500, f"Internal server error: {type(exc).__name__}"))
