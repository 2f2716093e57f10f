"""A real `rtserve serve --api-key ... --max-num-seqs 1`: auth, body limit, client disconnects (mid-stream,
queued, non-streaming) returning the engine gauges to baseline, the Realtime WebSocket, the access log."""
from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import openai
import pytest
from websockets.asyncio.client import connect

try:
    from tests.integration.fake_engine import ServerProcess
except ImportError:  # tests/integration not importable as a package
    from fake_engine import ServerProcess

pytestmark = pytest.mark.slow

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"messages": [{"role": "user", "content": "Count from one to one thousand."}], "max_tokens": 400,
        "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--api-key", KEY, "--max-num-seqs", "1", "--max-body-bytes", "200000") as s:
        yield s


def gauges(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    out = {}
    for line in text.splitlines():
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            if line.startswith(f"vllm:{name}{{"):
                out[name] = float(line.rsplit(" ", 1)[1])
    return out


def wait_for(predicate, timeout_s: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def baseline(server):
    wait_for(lambda: gauges(server)["num_requests_running"] == 0, what="an idle engine")
    before = gauges(server)
    yield before
    wait_for(lambda: gauges(server) == before, what=f"gauges back to {before}, now {gauges(server)}")


def test_auth_on_every_route_but_health(server):
    assert httpx.get(server.url + "/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/ready"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/messages"),
                         ("POST", "/tokenize"), ("POST", "/v1/messages/count_tokens")]:
        r = httpx.request(method, server.url + path, json={})
        assert r.status_code == 401, path
        assert httpx.request(method, server.url + path, json={}, headers={"x-api-key": "wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).models.list().data[0].owned_by == "rtserve"
    msg = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0).messages.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert msg.usage.output_tokens <= 2


def test_body_limit_413(server):
    big = {"messages": [{"role": "user", "content": "x" * 300_000}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(anthropic.RequestTooLargeError):
        anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0).messages.create(
            model="m", max_tokens=2, messages=[{"role": "user", "content": "x" * 300_000}])


def test_disconnect_mid_stream_frees_the_engine(server, baseline):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**LONG, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert gauges(server)["num_requests_running"] == 1
    t0 = time.monotonic()
    wait_for(lambda: gauges(server)["num_requests_running"] == 0, 5, "the abort")
    assert time.monotonic() - t0 < 5  # not the ~minute that 400 tokens would take


def test_disconnect_while_queued_and_non_streaming(server, baseline):
    """With one sequence slot: A decodes, B waits; B's client leaves, then A's (non-streaming) does too."""

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            a = asyncio.create_task(client.post("/v1/chat/completions", json=LONG))
            await asyncio.to_thread(wait_for, lambda: gauges(server)["num_requests_running"] == 1, 30, "A running")
            b = asyncio.create_task(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5},
                                                headers={"x-request-id": "queued-b"}))
            await asyncio.to_thread(wait_for, lambda: gauges(server)["num_requests_waiting"] == 1, 10, "B queued")
            b.cancel()
            await asyncio.to_thread(wait_for, lambda: gauges(server)["num_requests_waiting"] == 0, 5, "B aborted")
            assert gauges(server)["num_requests_running"] == 1
            a.cancel()
            await asyncio.to_thread(wait_for, lambda: gauges(server)["num_requests_running"] == 0, 5, "A aborted")
            await asyncio.gather(a, b, return_exceptions=True)

    asyncio.run(run())
    wait_for(lambda: '"request_id":"queued-b"' in server.log_text(), 5, "the access-log line")
    line = next(json.loads(x) for x in server.log_text().splitlines() if '"request_id":"queued-b"' in x)
    assert line["status"] == 499 and line["path"] == "/v1/completions"


async def test_realtime_two_turns_then_cancel(server, baseline):
    url = server.url.replace("http://", "ws://") + "/v1/realtime?model=m"

    async def recv_until(ws, event_type: str) -> list[dict]:
        events = [json.loads(await asyncio.wait_for(ws.recv(), 60))]
        while events[-1]["type"] != event_type:
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        return events

    async with connect(url, additional_headers=AUTH) as ws:
        assert (await recv_until(ws, "session.created"))[-1]["session"]["output_modalities"] == ["text"]
        await ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": 6}}))
        await recv_until(ws, "session.updated")
        texts = []
        for question in ("What is the capital of France?", "And of Italy?"):
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}}))
            await recv_until(ws, "conversation.item.created")
            await ws.send(json.dumps({"type": "response.create"}))
            events = await recv_until(ws, "response.done")
            done = events[-1]["response"]
            assert done["status"] in ("completed", "incomplete") and 0 < done["usage"]["output_tokens"] <= 6
            texts.append("".join(e["delta"] for e in events if e["type"] == "response.output_text.delta"))
            assert texts[-1] == events[-4]["text"]
        assert done["usage"]["input_tokens"] > 20  # the second turn's prompt holds the first turn
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 300}}))
        await recv_until(ws, "response.output_text.delta")
        t0 = time.monotonic()
        await ws.send(json.dumps({"type": "response.cancel"}))
        done = (await recv_until(ws, "response.done"))[-1]["response"]
        assert done["status"] == "cancelled" and time.monotonic() - t0 < 2.0
    await asyncio.to_thread(wait_for, lambda: gauges(server)["num_requests_running"] == 0, 5, "the cancel")


def test_access_log_echoes_request_id(server):
    r = httpx.get(server.url + "/v1/models", headers={**AUTH, "x-request-id": "it-123"})
    assert r.headers["x-request-id"] == "it-123"
    wait_for(lambda: '"request_id":"it-123"' in server.log_text(), 5, "the access-log line")
    line = next(json.loads(x) for x in server.log_text().splitlines() if '"request_id":"it-123"' in x)
    assert (line["method"], line["path"], line["status"]) == ("GET", "/v1/models", 200)


def test_models_show_the_backend_the_engine_logged(server):
    backend = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0]["backend"]
    assert backend.startswith("cpu ") and "quantization=" in backend  # the default model on the CPU
    assert f"backend: {backend} threads=" in server.log_text()
