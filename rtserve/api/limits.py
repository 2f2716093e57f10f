"""Request-body size limit as pure ASGI middleware (413 before the route ever parses anything).

Checks Content-Length up front and counts the streamed body too (chunked uploads have no Content-Length).
When the body goes over the limit mid-stream, `receive` raises `RequestTooLarge`, which the app's error
handler turns into a 413 in the route family's shape.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rtserve.api.errors import RequestTooLarge, error_body
from rtserve.api.sse import dumps


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_body_bytes <= 0:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope.get("headers", []))
        if declared is not None and declared > self.max_body_bytes:
            await _send_413(scope, send, self.max_body_bytes)
            return
        num_received = 0

        async def counting_receive() -> Message:
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > self.max_body_bytes:
                    raise RequestTooLarge(self.max_body_bytes)
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
