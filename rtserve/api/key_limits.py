"""Per-key request concurrency as pure ASGI middleware (inside the API-key check, so every key seen here
is a valid one): at most `max_per_key` HTTP requests of one key in flight; one more gets 429
(`rate_limit_error`, code `too_many_concurrent_requests`) with Retry-After at once, never a held
connection. A streaming request holds its slot until its stream ends. Liveness, the UI's public pages, the
dashboard's stats stream (monitoring, open for as long as the page is) and requests without a key are
not counted (`rtserve serve` refuses the limit without --api-key), nor are the server's own batch items. Keys are
held only as map keys in memory: they are never logged or echoed.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from rtserve.api.auth import PUBLIC_PATHS, PUBLIC_PREFIXES, presented_key
from rtserve.api.errors import ApiError, error_body
from rtserve.api.sse import dumps

RETRY_AFTER_S = 1
# Set in the scope of requests the server sends itself (batch items, rtserve/api/batches): they are bounded
# by their own in-flight limit and must not take the slots of the key that submitted the batch.
INTERNAL_SCOPE_KEY = "rtserve.internal"
UNCOUNTED_PATHS = frozenset({"/stats/stream"})


class KeyConcurrencyMiddleware:
    def __init__(self, app: ASGIApp, max_per_key: int) -> None:
        self.app = app
        self.max_per_key = max_per_key
        self.num_in_flight: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = presented_key(scope.get("headers", [])) if scope["type"] == "http" else None
        if (key is None or self.max_per_key <= 0 or scope.get(INTERNAL_SCOPE_KEY)
                or scope["path"] in PUBLIC_PATHS or scope["path"] in UNCOUNTED_PATHS or scope["path"].startswith(PUBLIC_PREFIXES)):
            await self.app(scope, receive, send)
            return
        if self.num_in_flight.get(key, 0) >= self.max_per_key:
            await _send_429(scope, send, self.max_per_key)
            return
        self.num_in_flight[key] = self.num_in_flight.get(key, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.num_in_flight[key] -= 1
            if not self.num_in_flight[key]:
                del self.num_in_flight[key]


async def _send_429(scope: Scope, send: Send, limit: int) -> None:
    err = ApiError(429, f"This API key already has {limit} request(s) in flight.",
                   code="too_many_concurrent_requests")
    await send({"type": "http.response.start", "status": 429, "headers": [
        (b"content-type", b"application/json"), (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": dumps(error_body(scope["path"], err)).encode()})
