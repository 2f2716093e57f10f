"""Structured access log: one JSON line per HTTP request / WebSocket session, with a request id.

The request id is the client's `x-request-id` (sanitised) or a fresh one; it is echoed in the response
headers and stored in `scope["state"]["request_id"]`. Routes may add fields (token counts, finish reason)
with `log_fields(request, ...)`. A client that went away before the response completed is logged as 499.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_logger = logging.getLogger("rtserve.access")

MAX_REQUEST_ID_LEN = 128


def configure_access_log(stream: Any = None) -> None:
    """Send access lines, as bare JSON, to `stream` (stderr by default) instead of the root logger."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.handlers[:] = [handler]
    access_logger.setLevel(logging.INFO)
    access_logger.propagate = False


def log_fields(conn: HTTPConnection, **fields: Any) -> None:
    """Attach extra fields to this request's access-log line."""
    conn.scope.setdefault("state", {}).setdefault("access_log", {}).update(fields)


def _sanitize(value: bytes) -> str | None:
    text = value.decode("latin-1")[:MAX_REQUEST_ID_LEN]
    return text if text and text.isprintable() else None


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        start_s = time.monotonic()
        headers = dict(scope.get("headers", []))
        request_id = _sanitize(headers.get(b"x-request-id", b"")) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        info: dict[str, Any] = {"status": None, "bytes_sent": 0, "complete": False, "disconnected": False}

        async def logged_send(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                info["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("latin-1"))]}
            elif kind == "http.response.body":
                info["bytes_sent"] += len(message.get("body", b""))
                info["complete"] = not message.get("more_body", False)
            elif kind == "websocket.accept":
                info["status"] = 101
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        async def logged_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not info["complete"]:
                info["disconnected"] = True
            return message

        try:
            await self.app(scope, logged_receive, logged_send)
        finally:
            status = 499 if info["disconnected"] else (info["status"] or 500)
            line = {"ts": round(time.time(), 3), "request_id": request_id, "method": scope.get("method", "WS"),
                    "path": scope["path"], "status": status,
                    "duration_ms": round((time.monotonic() - start_s) * 1000, 2),
                    "bytes_sent": info["bytes_sent"], "client": _client(scope),
                    **state.get("access_log", {})}
            access_logger.info(json.dumps(line, separators=(",", ":"), ensure_ascii=True))


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None
