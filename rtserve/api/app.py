"""App factory: `build_app(engine_client, settings)` wires middleware, error handlers and routes.

Middleware, outermost first: access log (request id) -> API key -> per-key concurrency -> drain (503
while shutting down) -> body-size limit -> FastAPI.
The lifespan starts the engine client (engine core process, model load) and shuts it down.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from starlette.requests import HTTPConnection

from rtserve.api.auth import ApiKeyMiddleware
from rtserve.api.batches.settings import BatchSettings
from rtserve.api.errors import ApiError, install_error_handlers
from rtserve.api.key_limits import KeyConcurrencyMiddleware
from rtserve.api.limits import BodyLimitMiddleware
from rtserve.api.logging import AccessLogMiddleware
from rtserve.api.metrics import ServingMetrics
from rtserve.api.openapi import install_openapi
from rtserve.api.shutdown import DrainMiddleware, DrainState
from rtserve.model.generation_config import SamplingDefaults


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-layer settings (the engine's own limits live in EngineConfig.limits)."""

    served_model_names: tuple[str, ...] = ()  # () -> the engine's model_name; the first is reported
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    ping_interval_s: float = 10.0        # Anthropic `ping` when nothing else was sent for this long
    send_timeout_s: float = 60.0         # drop a client that has not read for this long
    ready_timeout_s: float = 10.0        # /ready: one-token generation must finish within this
    manage_engine_lifecycle: bool = True  # lifespan calls engine.start() / engine.shutdown()
    max_concurrent_per_key: int = 0      # HTTP requests in flight per API key (0: unlimited)
    api_keys: tuple[str, ...] = ()       # more accepted keys besides api_key (each sees only its own batches)
    batches: BatchSettings | None = None  # the Batch API (rtserve/api/batches), off when None
    tool_call_parser: str = "auto"  # the tool-call format (rtserve/structured/tool_formats.py); auto: from the template
    # Values for sampling fields a request leaves unset (--generation-config); none: the OpenAI defaults
    sampling_defaults: SamplingDefaults = SamplingDefaults()

    @property
    def all_api_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for k in (self.api_key, *self.api_keys) if k))

    def __post_init__(self) -> None:
        if self.max_body_bytes < 0 or self.ping_interval_s <= 0 or self.send_timeout_s <= 0:
            raise ValueError("ServerSettings: max_body_bytes >= 0, ping_interval_s > 0, send_timeout_s > 0")
        if self.tool_call_parser not in ("auto", "hermes", "llama3_json", "mistral"):
            raise ValueError(f"ServerSettings: unknown tool_call_parser {self.tool_call_parser!r}")


@dataclass
class AppState:
    engine: Any  # AsyncLLM, or a test double with the same surface
    settings: ServerSettings
    metrics: ServingMetrics
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))
    drain: DrainState = field(default_factory=DrainState)  # graceful shutdown (rtserve/api/shutdown.py)

    def check_model(self, requested: str | None) -> str:
        """The served name to report; 404 for a model this server does not serve."""
        names = self.settings.served_model_names or (self.model_name,)
        if requested and requested not in names and requested != self.model_name:
            raise ApiError(404, f"The model `{requested[:100]}` does not exist.", param="model",
                           code="model_not_found")
        return requested or self.model_name


def app_state(conn: HTTPConnection) -> AppState:
    return conn.app.state.rtserve


def build_app(engine_client: Any, settings: ServerSettings | None = None) -> FastAPI:
    from rtserve.api import routes_anthropic, routes_openai, routes_ops, routes_realtime
    from rtserve.api.web import routes as routes_web

    settings = settings or ServerSettings()
    model_name = settings.served_model_names[0] if settings.served_model_names else engine_client.model_name

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.manage_engine_lifecycle:
            await engine_client.start()
        if batch_service is not None:
            await batch_service.start()
        try:
            yield
        finally:
            if batch_service is not None:
                await batch_service.stop()
            if settings.manage_engine_lifecycle:
                await engine_client.shutdown()

    app = FastAPI(title="rtserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.rtserve = AppState(engine_client, settings, ServingMetrics(model_name), model_name)
    engine_client.rt_listener = app.state.rtserve.metrics.rt  # per-class real-time metrics
    install_error_handlers(app)
    install_openapi(app)
    batch_service = None
    if settings.batches is not None:
        from rtserve.api.batches import service
        batch_service = service.install(app, settings.batches, settings.all_api_keys)
    for module in (routes_ops, routes_openai, routes_anthropic, routes_realtime, routes_web):
        app.include_router(module.router)
    # add_middleware puts each new one outermost: add innermost first.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       path_limits=batch_service.body_limits() if batch_service is not None else None)
    app.add_middleware(DrainMiddleware, drain=app.state.rtserve.drain)
    app.add_middleware(KeyConcurrencyMiddleware, max_per_key=settings.max_concurrent_per_key)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.all_api_keys)
    app.add_middleware(AccessLogMiddleware)
    return app
