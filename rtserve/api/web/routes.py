"""Routes of the browser UI: `/` (chat), `/dashboard`, `/ui/<asset>` and the stats stream.

The pages and their assets need no API key (a browser cannot send one on navigation; the page asks for
it and sends it on every API call); the stats stream, like every API route, does. Assets are served from
a fixed list of package files, so no request path ever reaches the file system. Every page and asset is
sent with a Content-Security-Policy that allows only this origin's scripts and styles.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import Response

from rtserve.api.app import app_state
from rtserve.api.errors import ApiError
from rtserve.api.sse import sse_comment, sse_data
from rtserve.api.streaming import EventStreamResponse
from rtserve.api.web.live_stats import LiveStats

router = APIRouter()

PAGES = {"/": "chat.html", "/dashboard": "dashboard.html"}
ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".html": "text/html; charset=utf-8"}
ASSETS = frozenset({"chat.js", "transports.js", "dashboard.js", "common.js", "markdown.js", "plots.js", "style.css"})
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
MIN_INTERVAL_MS, MAX_INTERVAL_MS = 100, 10_000


def _static(name: str) -> Response:
    body = resources.files("rtserve.api.web").joinpath("static", name).read_bytes()
    media_type = ASSET_TYPES[name[name.rfind("."):]]
    return Response(body, media_type=media_type, headers={
        "content-security-policy": CSP, "x-content-type-options": "nosniff", "cache-control": "no-cache",
        "referrer-policy": "no-referrer"})


@router.get("/")
async def chat_page() -> Response:
    return _static(PAGES["/"])


@router.get("/dashboard")
async def dashboard_page() -> Response:
    return _static(PAGES["/dashboard"])


@router.get("/ui/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"No UI asset named {name[:100]!r}.", code="not_found")
    return _static(name)


def live_stats(request: Request) -> LiveStats:
    """The app's one LiveStats (created by the first viewer)."""
    stats = getattr(request.app.state, "live_stats", None)
    if stats is None:
        state = app_state(request)
        stats = request.app.state.live_stats = LiveStats(state.metrics, state.engine,
                                                         min_interval_s=0.9 * MIN_INTERVAL_MS / 1000.0)
    return stats


def parse_interval_ms(raw: str | None) -> int:
    if raw is None:
        return 1000
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not MIN_INTERVAL_MS <= value <= MAX_INTERVAL_MS:
        raise ApiError(400, f"interval_ms must be an integer from {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS} "
                            f"(got {raw[:30]!r}).", param="interval_ms", code="invalid_value")
    return value


@router.get("/stats/stream")
async def stats_stream(request: Request) -> Response:
    """Server-sent stats: the kept recent points at once, then one point every `interval_ms` (default 1000).

    Not counted against a key's concurrency limit (rtserve/api/key_limits.py); ends when the server drains.
    """
    interval_s = parse_interval_ms(request.query_params.get("interval_ms")) / 1000.0
    stats, drain = live_stats(request), app_state(request).drain

    async def events() -> AsyncIterator[bytes]:
        yield sse_comment("rtserve stats")
        kept = list(stats.points)
        for point in kept:
            yield sse_data(point)
        last = kept[-1] if kept else None
        while not drain.is_draining:  # a shutdown ends the stream (the page reconnects to the next server)
            point = stats.latest()
            if point is not last:  # another viewer's sample may still be the newest one
                yield sse_data(point)
                last = point
            await asyncio.sleep(interval_s)

    return EventStreamResponse(events(), send_timeout_s=app_state(request).settings.send_timeout_s)
