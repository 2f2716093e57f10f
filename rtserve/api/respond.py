"""The tail every generation route shares: stream (SSE) or collect (JSON), with disconnect watching.

A firm request's stream sends nothing before its first delta, so a deadline drop while queued can
still be a clean HTTP error; a client that leaves before a non-streaming answer gets a 499 in the log.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from rtserve.api.app import AppState
from rtserve.api.errors import ApiError, engine_failure
from rtserve.api.logging import log_fields
from rtserve.api.rt_fields import first_output_of_firm
from rtserve.api.sse import dumps
from rtserve.api.streaming import (ClientDisconnected, ClosingBody, EventStreamResponse, OutputStream,
                                   run_until_disconnect)
from rtserve.protocol import RTParams


async def stream_response(request: Request, state: AppState, rt: RTParams, outputs: OutputStream,
                          events: Callable[[OutputStream, Any], AsyncIterator[bytes]]) -> Response:
    """SSE response over `outputs`; `events(outputs, first)` encodes the wire format."""
    try:
        first = await run_until_disconnect(request.receive, first_output_of_firm(outputs, rt))
    except ClientDisconnected:
        await outputs.aclose()
        return Response(status_code=499)
    except ApiError:
        raise
    except Exception as exc:
        await outputs.aclose()
        raise engine_failure(exc, state.engine.is_dead) from exc
    return EventStreamResponse(ClosingBody(events(outputs, first), outputs),
                               send_timeout_s=state.settings.send_timeout_s)


async def json_response(request: Request, state: AppState, collect: Awaitable[dict[str, Any]]) -> Response:
    """JSON response from `collect` (a body dict; `_server_timing` becomes the Server-Timing header)."""
    try:
        body = await run_until_disconnect(request.receive, collect)
    except ClientDisconnected:
        log_fields(request, disconnected=True)
        return Response(status_code=499)
    except ApiError:
        raise
    except Exception as exc:
        raise engine_failure(exc, state.engine.is_dead) from exc
    log_fields(request, **body["usage"])
    timing = body.pop("_server_timing", "")
    return Response(dumps(body).encode(), media_type="application/json",
                    headers={"server-timing": timing} if timing else None)
