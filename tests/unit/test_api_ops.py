"""Operations routes and the access log: /health, /ready, /tokenize, /detokenize, request ids, lifespan."""
from __future__ import annotations

import json
import logging

from tests.integration.fake_engine import FakeEngine, asgi_client, build_test_app


async def test_health_and_ready():
    app, engine = build_test_app()
    async with asgi_client(app) as c:
        r = await c.get("/health")
        assert r.status_code == 200 and r.content == b""
        assert (await c.get("/ready")).json() == {"status": "ready"}
        engine.ready = False
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "not_ready"}
        engine.is_dead = True
        assert (await c.get("/health")).status_code == 503


async def test_ready_times_out_instead_of_hanging():
    class Stuck(FakeEngine):
        async def check_ready(self, timeout_s: float = 10.0) -> bool:
            import asyncio
            await asyncio.sleep(60)
            return True
    app, _ = build_test_app(Stuck(), ready_timeout_s=0.05)
    async with asgi_client(app) as c:
        assert (await c.get("/ready")).status_code == 503


async def test_tokenize_detokenize():
    app, engine = build_test_app()
    async with asgi_client(app) as c:
        r = await c.post("/tokenize", json={"prompt": "hi"})
        assert r.json() == {"tokens": [105, 106], "count": 2, "max_model_len": engine.max_model_len}
        r = await c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["count"] == len(engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
        assert (await c.post("/detokenize", json={"tokens": [105, 106]})).json() == {"prompt": "hi"}
        assert (await c.post("/detokenize", json={"tokens": [9999]})).status_code == 400
        assert (await c.post("/detokenize", json={"tokens": "x"})).status_code == 400
        assert (await c.post("/tokenize", json={})).status_code == 400


async def test_access_log_json_with_request_id(caplog):
    app, _ = build_test_app()
    caplog.set_level(logging.INFO, logger="rtserve.access")
    async with asgi_client(app) as c:
        r = await c.post("/v1/chat/completions", headers={"x-request-id": "abc-123"},
                         json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.headers["x-request-id"] == "abc-123"
        r2 = await c.get("/v1/models")
        generated = r2.headers["x-request-id"]
        assert len(generated) == 32
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "rtserve.access"]
    chat = next(line for line in lines if line["request_id"] == "abc-123")
    assert chat["path"] == "/v1/chat/completions" and chat["method"] == "POST" and chat["status"] == 200
    assert chat["completion_tokens"] == 2 and chat["id"].startswith("chatcmpl-") and chat["duration_ms"] >= 0
    assert any(line["request_id"] == generated and line["status"] == 200 for line in lines)


async def test_hostile_request_id_is_replaced(caplog):
    app, _ = build_test_app()
    async with asgi_client(app) as c:
        r = await c.get("/health", headers={"x-request-id": "a" * 500})
    assert r.headers["x-request-id"] != "a" * 500


async def test_lifespan_starts_and_stops_engine():
    from rtserve.api.app import ServerSettings, build_app
    engine = FakeEngine()
    app = build_app(engine, ServerSettings())
    async with app.router.lifespan_context(app):
        assert engine.num_starts == 1
    assert engine.num_shutdowns == 1
