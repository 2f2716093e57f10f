"""uvicorn's httptools protocol plus two guards uvicorn does not have, and its connection cap answered in JSON.

- A cap on request-line + header bytes: httptools buffers a header of any size (a 20 MB header is
  accepted), so bytes are counted as they arrive and the connection gets a 431 and is closed once the
  headers of one request exceed the cap (checked before feeding the parser; the excess is at most one read).
- A header-read timeout (slowloris): a connection must complete a request's headers within
  `header_timeout_s` of opening, or of its previous response; trickling bytes does not reset it.
  (uvicorn's keep-alive timeout only covers idle time after a response.)
- `--limit-concurrency` N: uvicorn's own rule (a request is refused while N connections are open or N
  requests are being answered) but the refusal is the route family's error object with Retry-After
  (OpenAI 503 `server_error` code `server_at_capacity`, Anthropic 529 `overloaded_error`) instead of
  uvicorn's plain-text 503, and liveness `/health` is always answered. WebSocket upgrades are not refused
  by it (uvicorn does not check them either), though open sessions count as connections.
"""
from __future__ import annotations

import asyncio
from typing import Any

import httptools
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rtserve.api.errors import ApiError, error_body, is_anthropic_path, openai_error_body
from rtserve.api.shutdown import LIVENESS_PATH
from rtserve.api.sse import dumps

CAPACITY_RETRY_AFTER_S = 1


def _response_431() -> bytes:
    body = dumps(openai_error_body(ApiError(431, "Request line and headers are too large.",
                                            code="request_header_fields_too_large"))).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def refuse_at_capacity(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer to a request over the connection cap (an ASGI app; the connection is closed after it)."""
    status = 529 if is_anthropic_path(scope["path"]) else 503
    err = ApiError(status, "The server is at its connection limit; retry shortly.", code="server_at_capacity")
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"retry-after", str(CAPACITY_RETRY_AFTER_S).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": dumps(error_body(scope["path"], err)).encode()})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = 64 * 1024
    header_timeout_s = 10.0
    connection_cap: int | None = None  # --limit-concurrency (uvicorn's own limit_concurrency stays None)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._in_headers = True
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            if self._header_bytes > self.max_header_bytes:
                self._disarm_header_timer()
                self.transport.write(_response_431())
                self.transport.close()
                return
            self._header_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm_header_timer()
        if not self._over_capacity():
            super().on_headers_complete()
            return
        # uvicorn reads self.app here to start (or queue) this request's task: swap in the refusal for it
        app, self.app = self.app, refuse_at_capacity
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def _over_capacity(self) -> bool:
        cap = self.connection_cap
        if cap is None or (len(self.connections) < cap and len(self.tasks) < cap) or self.parser.should_upgrade():
            return False
        return httptools.parse_url(self.url).path != LIVENESS_PATH.encode()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._in_headers = True
            self._header_bytes = 0
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def guarded_httptools(max_header_bytes: int, header_timeout_s: float, connection_cap: int | None = None) -> type[Any]:
    """A protocol class for `uvicorn.Config(http=...)` with these limits."""
    return type("GuardedHttpTools", (GuardedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s,
                 "connection_cap": connection_cap})
