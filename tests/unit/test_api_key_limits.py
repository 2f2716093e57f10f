"""Per-key concurrency: one key over its limit gets 429 + Retry-After at once, another key is unaffected,
and the slot comes back when the request ends (fake engine held by a gate)."""
from __future__ import annotations

import asyncio
import dataclasses

from rtserve.api.app import ServerSettings
from tests.integration.fake_engine import FakeEngine, asgi_client, build_test_app

BODY = {"prompt": "hi", "max_tokens": 3}


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def two_keys() -> dict:
    """Settings accepting keys "key-alpha" and "key-beta" (a second key has its own field where settings have one)."""
    if "api_keys" in {f.name for f in dataclasses.fields(ServerSettings)}:
        return {"api_key": "key-alpha", "api_keys": ("key-beta",)}
    return {"api_key": ("key-alpha", "key-beta")}


async def until(predicate) -> None:
    async def poll():
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), 10)


async def test_one_key_over_its_limit_is_refused_others_are_not():
    gate = asyncio.Event()
    app, engine = build_test_app(FakeEngine(gate=gate), max_concurrent_per_key=1, **two_keys())
    async with asgi_client(app) as client:
        held = asyncio.create_task(client.post("/v1/completions", json=BODY, headers=auth("key-alpha")))
        await until(lambda: engine.started)
        r = await client.post("/v1/completions", json=BODY, headers=auth("key-alpha"))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["code"] == "too_many_concurrent_requests" and "key-alpha" not in error["message"]
        r = await client.post("/v1/messages", json={"max_tokens": 2, "messages": []},
                              headers={"x-api-key": "key-alpha"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"  # Anthropic shape
        assert (await client.get("/health")).status_code == 200  # liveness is never counted
        other = asyncio.create_task(client.post("/v1/completions", json=BODY, headers=auth("key-beta")))
        await until(lambda: len(engine.started) == 2)
        gate.set()
        assert (await held).status_code == 200 and (await other).status_code == 200
        assert (await client.post("/v1/completions", json=BODY, headers=auth("key-alpha"))).status_code == 200
        assert (await client.post("/v1/completions", json=BODY, headers=auth("wrong"))).status_code == 401


async def test_keys_are_never_logged_or_echoed(caplog):
    import logging
    caplog.set_level(logging.DEBUG)
    app, _ = build_test_app(FakeEngine(), max_concurrent_per_key=1, **two_keys())
    async with asgi_client(app) as client:
        ok = await client.post("/v1/completions", json=BODY, headers=auth("key-alpha"))
        bad = await client.post("/v1/completions", json=BODY, headers=auth("key-gamma-wrong"))
        anthropic = await client.post("/v1/messages", json={}, headers={"x-api-key": "key-beta"})
    assert (ok.status_code, bad.status_code, anthropic.status_code) == (200, 401, 400)
    for r in (ok, bad, anthropic):
        assert not any(k in r.text or k in str(r.headers) for k in ("key-alpha", "key-beta", "key-gamma"))
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "rtserve.access" in {rec.name for rec in caplog.records}
    assert not any(k in logged for k in ("key-alpha", "key-beta", "key-gamma"))
