"""DrainMiddleware on the fake engine: while draining, new requests get 503 + Retry-After in the route
family's error shape, liveness still answers, and requests in flight are counted."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.integration.fake_engine import FakeEngine, LiveServer, asgi_client, build_test_app


async def test_draining_refuses_new_requests_but_not_liveness():
    app, _ = build_test_app()
    drain = app.state.rtserve.drain
    async with asgi_client(app) as client:
        assert (await client.get("/ready")).status_code == 200
        drain.is_draining, drain.drain_deadline_s = True, time.monotonic() + 7.5
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers["retry-after"] in ("7", "8") and r.headers["connection"] == "close"
        assert r.json()["error"] == {"message": "The server is shutting down.", "type": "server_error",
                                     "param": None, "code": "server_shutting_down"}
        r = await client.post("/v1/messages", json={})
        assert r.status_code == 503 and r.json() == {"type": "error", "error": {
            "type": "api_error", "message": "The server is shutting down."}}
        assert (await client.get("/ready")).status_code == 503
        assert (await client.get("/health")).status_code == 200


async def test_requests_in_flight_are_counted():
    gate = asyncio.Event()
    app, engine = build_test_app(FakeEngine(gate=gate))
    drain = app.state.rtserve.drain
    async with asgi_client(app) as client:
        task = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}))
        while not engine.started:
            await asyncio.sleep(0.01)
        assert drain.num_in_flight == 1
        gate.set()
        assert (await task).status_code == 200
    assert drain.num_in_flight == 0


async def test_draining_refuses_websocket_upgrades():
    app, _ = build_test_app()
    drain = app.state.rtserve.drain
    with LiveServer(app) as server:
        url = server.url.replace("http://", "ws://") + "/v1/realtime?model=fake-model"
        async with connect(url) as ws:  # before the drain: accepted
            await ws.recv()
        drain.is_draining, drain.drain_deadline_s = True, time.monotonic() + 5
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url):
                pass
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["retry-after"] in ("4", "5")


async def test_the_stats_stream_does_not_hold_the_drain():
    app, _ = build_test_app()
    drain = app.state.rtserve.drain
    with LiveServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            async with client.stream("GET", "/stats/stream") as r:
                assert r.status_code == 200
                await r.aiter_lines().__anext__()
                assert drain.num_in_flight == 0
