"""The Batch API's wiring: store + runner on `app.state.batches`, its routes, and in-process dispatch.

`install(app, settings, api_keys)` is called by build_app when a data directory is configured; the app's
lifespan calls `start()` after the engine is up and `stop()` before it goes down. Items reach the engine
through `asgi_dispatch`: the app's own routes, in process, with the first configured key.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.requests import HTTPConnection
from starlette.types import Receive, Scope, Send

from rtserve.api.auth import presented_key
from rtserve.api.batches.runner import BatchRunner, Dispatch
from rtserve.api.batches.settings import BatchSettings
from rtserve.api.batches.store import BatchStore
from rtserve.api.batches.validate import check_openai_body
from rtserve.api.errors import ApiError
from rtserve.api.key_limits import INTERNAL_SCOPE_KEY

logger = logging.getLogger("rtserve.api.batches")


def asgi_dispatch(app: FastAPI, api_key: str | None) -> tuple[Dispatch, httpx.AsyncClient]:
    """POST an item to the app's own endpoint in process (through its middleware, like any client)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    async def internal(scope: Scope, receive: Receive, send: Send) -> None:
        scope[INTERNAL_SCOPE_KEY] = "batch"  # not counted against the key's concurrency (key_limits.py)
        await app(scope, receive, send)

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=internal), base_url="http://batch.internal",
                               headers=headers, timeout=None)

    async def dispatch(api: str, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        r = await client.post(endpoint, json=body)
        try:
            answer = r.json()
        except ValueError:
            answer = {"error": {"message": f"HTTP {r.status_code} with a non-JSON body", "type": "server_error",
                                "param": None, "code": None}}
        return r.status_code, answer, r.headers.get("x-request-id")

    return dispatch, client


@dataclass
class BatchService:
    settings: BatchSettings
    store: BatchStore
    runner: BatchRunner
    client: httpx.AsyncClient
    api_keys: tuple[str, ...]

    def owner_of(self, conn: HTTPConnection) -> str:
        """Who may see a batch or file: a digest of the request's API key (one shared owner without keys)."""
        if not self.api_keys:
            return ""
        key = presented_key(conn.scope.get("headers", [])) or ""
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def body_limits(self) -> dict[str, int]:
        """Upload paths take bodies up to the file limit (plus room for the multipart framing)."""
        limit = self.settings.max_file_bytes + 64 * 1024
        return {"/v1/files": limit, "/v1/messages/batches": limit}

    async def start(self) -> None:
        logger.debug("batch API data directory: %s", self.settings.data_dir)  # `rtserve serve` prints it
        await self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()
        await self.client.aclose()
        await asyncio.to_thread(self.store.close)


def service_of(conn: HTTPConnection) -> BatchService:
    service = getattr(conn.app.state, "batches", None)
    if service is None:
        raise ApiError(404, "The batch API is not enabled on this server.")
    return service


def install(app: FastAPI, settings: BatchSettings, api_keys: tuple[str, ...]) -> BatchService:
    from rtserve.api.batches import routes_anthropic, routes_files, routes_openai

    store = BatchStore(settings.db_path, settings.files_dir)
    dispatch, client = asgi_dispatch(app, api_keys[0] if api_keys else None)
    runner = BatchRunner(store, settings, dispatch, check_openai_body(app.state.rtserve))
    service = BatchService(settings, store, runner, client, api_keys)
    app.state.batches = service
    for module in (routes_files, routes_openai, routes_anthropic):
        app.include_router(module.router)
    return service
