"""Browser UI routes: pages and assets without a key, the stats stream behind it, and the WebSocket key
carried as a subprotocol (what a browser can send)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.integration.fake_engine import LiveServer, asgi_client, build_test_app

KEY = "test-key"


@pytest.fixture
def server():
    app, _ = build_test_app(api_key=KEY)
    with LiveServer(app) as s:
        yield s


async def test_pages_and_assets_need_no_key_and_carry_a_csp():
    app, _ = build_test_app(api_key=KEY)
    async with asgi_client(app) as client:
        for path, kind in (("/", "text/html"), ("/dashboard", "text/html"), ("/ui/chat.js", "text/javascript"),
                           ("/ui/style.css", "text/css")):
            r = await client.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
            assert "script-src 'self'" in r.headers["content-security-policy"]
        assert 'src="/ui/chat.js"' in (await client.get("/")).text
        for path in ("/ui/nothing.js", "/ui/..%2Fapp.py", "/ui/static"):
            r = await client.get(path)
            assert r.status_code == 404 and "error" in r.json(), path
        assert (await client.get("/v1/models")).status_code == 401  # the API itself still needs the key


async def test_stats_stream_needs_the_key_and_checks_interval():
    app, _ = build_test_app(api_key=KEY)
    async with asgi_client(app) as client:
        assert (await client.get("/stats/stream")).status_code == 401
        r = await client.get("/stats/stream?interval_ms=5", headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "interval_ms"
        r = await client.get("/stats/stream?interval_ms=soon", headers={"x-api-key": KEY})
        assert r.status_code == 400 and r.json()["error"]["param"] == "interval_ms"


def test_stats_stream_sends_points_and_replays_them_to_the_next_viewer(server):
    def read_points(n: int) -> list[dict]:
        points = []
        with httpx.stream("GET", server.url + "/stats/stream?interval_ms=100", timeout=10,
                          headers={"authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    points.append(json.loads(line[6:]))
                    if len(points) == n:
                        return points
        raise AssertionError("stream ended early")

    first = read_points(3)
    assert {"t", "running", "waiting", "kv_usage", "tokens_per_s", "ttft_ms", "itl_ms", "prefix_hit_rate",
            "slo_attainment", "rejections", "drops", "preemptions"} <= set(first[0])
    assert first[0]["t"] < first[-1]["t"]
    again = read_points(2)
    assert again[0] == first[0]  # the kept points come first, so a new dashboard starts with a history


async def test_realtime_key_as_subprotocol(server):
    url = server.url.replace("http://", "ws://") + "/v1/realtime"
    async with connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "session.created"
    with pytest.raises(InvalidStatus) as exc:
        async with connect(url, subprotocols=["realtime", "openai-insecure-api-key.wrong"]):
            pass
    assert exc.value.response.status_code == 401
    async with connect(url, additional_headers={"authorization": f"Bearer {KEY}"}) as ws:
        assert ws.subprotocol is None  # a client that offered no subprotocol gets none


def test_stats_stream_holds_no_concurrency_slot_and_ends_on_drain():
    app, _ = build_test_app(api_key=KEY, max_concurrent_per_key=1)
    headers = {"authorization": f"Bearer {KEY}"}
    with LiveServer(app) as server, httpx.stream("GET", server.url + "/stats/stream?interval_ms=100",
                                                 headers=headers, timeout=10) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        r = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=10,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200  # the open dashboard stream does not use up the key's one slot
        app.state.rtserve.drain.is_draining = True
        for _ in lines:  # the stream ends by itself
            pass
