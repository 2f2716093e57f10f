"""Graceful shutdown and fail-fast engine death for `rtserve serve`.

SIGTERM or SIGINT starts a drain: the socket stays open, but every new HTTP request and WebSocket
upgrade gets 503 with Retry-After (liveness `/health` still answers 200, readiness `/ready` 503), and the
requests in flight run on for up to `shutdown_timeout_s`. Those still running then are aborted: each
stream ends with its final event (OpenAI `finish_reason: "abort"`) and each non-streaming body comes
back with what was generated. Only then is uvicorn told to exit: it closes the socket, the lifespan
stops the engine process, and the process exits 0. A second signal kills the engine process and exits
at once (status 1).

If the engine dies on its own (killed, crashed, its loop raised), every waiting request has already
been failed by the engine client, `/health` answers 503, and the server exits non-zero
(`ENGINE_DEAD_EXIT_STATUS`) after a short grace for those error responses to go out, so a supervisor
restarts it. With `engine_restart` it starts a new engine core instead (503s until it is ready) and
counts the restart in /metrics (`rtserve:engine_restarts_total`).
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from rtserve.api.errors import ApiError, error_body
from rtserve.api.sse import dumps

logger = logging.getLogger("rtserve.api")

ENGINE_DEAD_EXIT_STATUS = 3
FORCED_EXIT_STATUS = 1
LIVENESS_PATH = "/health"
# Endless observer streams (the dashboard's stats) are not requests the drain waits for.
UNCOUNTED_PATHS = frozenset({"/stats/stream"})
_POLL_S = 0.05
_ERROR_FLUSH_S = 1.0      # after the engine died: time for the error events to reach their clients
_ABORT_SETTLE_S = 5.0     # after aborting: time for the aborted responses to send their final event


@dataclass
class DrainState:
    """Whether the server is draining, and how many HTTP requests are in flight (kept by DrainMiddleware)."""

    is_draining: bool = False
    drain_deadline_s: float = 0.0  # monotonic; in-flight requests are aborted after it
    num_in_flight: int = 0

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.drain_deadline_s - time.monotonic()))


class DrainMiddleware:
    """Counts in-flight HTTP requests; while draining, refuses new ones (and WebSocket upgrades) with 503."""

    def __init__(self, app: ASGIApp, drain: DrainState) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.drain.is_draining and scope["path"] != LIVENESS_PATH:
            await self._refuse(scope, receive, send)
            return
        if scope["type"] == "websocket" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)  # a session is not a request: the drain waits on its responses
            return
        self.drain.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.num_in_flight -= 1

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = ApiError(503, "The server is shutting down.", code="server_shutting_down")
        body = dumps(error_body(scope["path"], err)).encode()
        headers = [(b"content-type", b"application/json"), (b"retry-after", str(self.drain.retry_after_s()).encode()),
                   (b"connection", b"close")]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 503, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1012, "reason": "server shutting down"})


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose signals drain first (see the module docstring) and whose exit status tells why."""

    def __init__(self, config: uvicorn.Config, state: Any, shutdown_timeout_s: float,
                 engine_restart: bool = False) -> None:
        super().__init__(config)
        self.engine = state.engine
        self.drain: DrainState = state.drain
        self.metrics = state.metrics
        self.shutdown_timeout_s = shutdown_timeout_s
        self.engine_restart = engine_restart
        self.exit_status = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            self._spawn(self._watch_engine())

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (uvicorn installs it). Unlike uvicorn's, it does not record the signal, so
        uvicorn does not raise it again once shut down: a drained server exits 0, not -15."""
        if self.drain.is_draining or self._loop is None or not self.started:
            self._exit_now(sig)
        self.drain.is_draining = True
        self.drain.drain_deadline_s = time.monotonic() + self.shutdown_timeout_s
        logger.info("%s: draining (%d in flight, up to %.1f s); a second signal exits at once",
                    signal.Signals(sig).name, self._num_in_flight(), self.shutdown_timeout_s)
        self._loop.call_soon_threadsafe(lambda: self._spawn(self._drain_then_exit()))

    def _exit_now(self, sig: int) -> None:
        logger.warning("%s: exiting now", signal.Signals(sig).name)
        kill = getattr(self.engine, "kill", None)
        if kill is not None:
            kill()
        os._exit(FORCED_EXIT_STATUS)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _num_in_flight(self) -> int:
        return self.drain.num_in_flight + getattr(self.engine, "num_requests", 0)

    async def _wait_idle(self, until_s: float) -> bool:
        while self._num_in_flight() > 0 and time.monotonic() < until_s:
            await asyncio.sleep(_POLL_S)
        return self._num_in_flight() == 0

    async def _drain_then_exit(self) -> None:
        if not await self._wait_idle(self.drain.drain_deadline_s):
            ids = self.engine.abort_all("the server is shutting down")
            logger.warning("shutdown timeout: aborted %d request(s) still in flight", len(ids))
            await self._wait_idle(time.monotonic() + _ABORT_SETTLE_S)
        logger.info("drained; shutting down")
        self.should_exit = True

    async def _watch_engine(self) -> None:
        while not self.should_exit:
            if self.engine.is_dead and not self.drain.is_draining:
                reason = getattr(self.engine, "dead_reason", "")
                if self.engine_restart and await self._restart_engine(reason):
                    continue
                logger.error("engine died (%s): exiting with status %d", reason, ENGINE_DEAD_EXIT_STATUS)
                self.exit_status = ENGINE_DEAD_EXIT_STATUS
                await asyncio.sleep(_ERROR_FLUSH_S)
                self.should_exit = True
                return
            await asyncio.sleep(_POLL_S)

    async def _restart_engine(self, reason: str) -> bool:
        """--engine-restart: a new engine core in place of the dead one (its waiters were already failed)."""
        logger.error("engine died (%s): starting a new engine core", reason)
        try:
            await self.engine.restart()
        except Exception:  # noqa: BLE001 - a restart that fails ends the server like any engine death
            logger.exception("engine restart failed")
            return False
        self.metrics.num_engine_restarts += 1
        logger.info("engine restarted (%d restart(s) so far)", self.metrics.num_engine_restarts)
        return True
