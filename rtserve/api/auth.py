"""API-key check as pure ASGI middleware: every HTTP and WebSocket route except liveness (/health) and
the browser UI's pages and static assets (`/`, `/dashboard`, `/ui/...`: a browser cannot send a key when
it navigates; the page asks for the key and sends it on every API call).

Accepts `Authorization: Bearer KEY` (OpenAI SDK) and `x-api-key: KEY` (Anthropic SDK); a WebSocket
upgrade may instead offer the subprotocol `openai-insecure-api-key.KEY` (as OpenAI's browser Realtime
clients do, since a browser cannot set headers on a WebSocket). A rejected WebSocket
upgrade gets an HTTP 401 through the ASGI websocket denial-response extension when the server offers it.
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rtserve.api.errors import ApiError, error_body
from rtserve.api.sse import dumps

PUBLIC_PATHS = frozenset({"/health", "/", "/dashboard"})
PUBLIC_PREFIXES = ("/ui/",)


WS_KEY_PROTOCOL = "openai-insecure-api-key."


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"sec-websocket-protocol":
            for protocol in value.decode("latin-1").split(","):
                if protocol.strip().startswith(WS_KEY_PROTOCOL):
                    return protocol.strip()[len(WS_KEY_PROTOCOL):]
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | tuple[str, ...] | None) -> None:
        self.app = app
        self.api_keys = (api_key,) if isinstance(api_key, str) else tuple(api_key or ())  # any one of them

    def _authorized(self, scope: Scope) -> bool:
        key = presented_key(scope.get("headers", []))
        # compare with every key (no early exit), so the time taken does not tell which key came closest
        matches = [hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys] if key is not None else []
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (not self.api_keys or scope["type"] not in ("http", "websocket")
                or scope["path"] in PUBLIC_PATHS or scope["path"].startswith(PUBLIC_PREFIXES)
                or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        body = dumps(error_body(scope["path"], ApiError(401, "Invalid or missing API key.",
                                                         code="invalid_api_key"))).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await _reject_websocket(receive, send)


async def _reject_websocket(receive: Receive, send: Send) -> None:
    message: Message = await receive()  # websocket.connect
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
