"""A client that goes away aborts its engine request: streaming or not, queued or decoding.

The ASGI-level tests advertise ASGI spec 2.4 on purpose: Starlette then stops watching for disconnects
itself, so these pass only because rtserve watches `http.disconnect` as its own task.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.integration.fake_engine import FakeEngine, LiveServer, build_test_app

USER = [{"role": "user", "content": "hi"}]


class AsgiCall:
    """Drive the app directly: send one request body, then report a disconnect when told to."""

    def __init__(self, app, path: str, body: dict, stall_after_first_body: bool = False) -> None:
        self.sent: list[dict] = []
        self.disconnect = asyncio.Event()
        raw = json.dumps(body).encode()
        self._body_given = False
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 5555), "server": ("test", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}

        async def receive():
            if not self._body_given:
                self._body_given = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await self.disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            self.sent.append(message)
            if stall_after_first_body and message.get("body"):
                await asyncio.Event().wait()  # a reader that never reads again

        self.task = asyncio.create_task(app(scope, receive, send))

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    async def wait_for_body(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.body:
            assert time.monotonic() < deadline, "no body"
            await asyncio.sleep(0.005)


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


async def test_streaming_disconnect_mid_decode_aborts():
    app, engine = build_test_app(FakeEngine(reply="x" * 1000, step_s=0.01))
    call = AsgiCall(app, "/v1/chat/completions", {"messages": USER, "stream": True})
    await call.wait_for_body()
    call.disconnect.set()
    await asyncio.wait_for(call.task, 2.0)
    assert len(engine.started) == 1 and engine.aborted == engine.started and engine.finished == []
    assert engine.stats.num_running == 0
    assert app.state.rtserve.metrics.num_finished["abort"] == 1


async def test_non_streaming_disconnect_aborts_and_logs_499():
    gate = asyncio.Event()  # never set: the request would decode forever
    app, engine = build_test_app(FakeEngine(gate=gate))
    call = AsgiCall(app, "/v1/chat/completions", {"messages": USER})
    await wait_until(lambda: engine.stats.num_running == 1)
    call.disconnect.set()
    await asyncio.wait_for(call.task, 2.0)
    assert engine.aborted == engine.started and engine.stats.num_running == 0
    assert call.sent[0]["status"] == 499


async def test_disconnect_while_queued_aborts_before_scheduling():
    gate = asyncio.Event()
    app, engine = build_test_app(FakeEngine(gate=gate, max_running=1))
    holder = AsgiCall(app, "/v1/chat/completions", {"messages": USER, "stream": True})
    await wait_until(lambda: engine.stats.num_running == 1)
    queued = AsgiCall(app, "/v1/completions", {"prompt": "hi", "stream": False})
    await wait_until(lambda: engine.stats.num_waiting == 1)
    queued.disconnect.set()
    await asyncio.wait_for(queued.task, 2.0)
    assert engine.aborted == [engine.started[1]]
    assert (engine.stats.num_running, engine.stats.num_waiting) == (1, 0)
    holder.disconnect.set()
    await asyncio.wait_for(holder.task, 2.0)
    assert sorted(engine.aborted) == sorted(engine.started) and engine.stats.num_running == 0


async def test_anthropic_stream_disconnect_aborts():
    app, engine = build_test_app(FakeEngine(reply="x" * 1000, step_s=0.01))
    call = AsgiCall(app, "/v1/messages", {"max_tokens": 400, "messages": USER, "stream": True})
    await wait_until(lambda: b"content_block_delta" in call.body)
    call.disconnect.set()
    await asyncio.wait_for(call.task, 2.0)
    assert len(engine.started) == 1 and engine.aborted == engine.started


async def test_n_choices_all_aborted():
    app, engine = build_test_app(FakeEngine(reply="x" * 1000, step_s=0.01))
    call = AsgiCall(app, "/v1/chat/completions", {"messages": USER, "n": 3, "stream": True})
    await call.wait_for_body()
    call.disconnect.set()
    await asyncio.wait_for(call.task, 2.0)
    assert sorted(engine.aborted) == sorted(engine.started) and len(engine.started) == 3


def test_real_socket_close_mid_stream_aborts():
    app, engine = build_test_app(FakeEngine(reply="x" * 2000, step_s=0.005))
    with LiveServer(app) as server:
        with httpx.Client(base_url=server.url) as client:
            with client.stream("POST", "/v1/chat/completions", json={"messages": USER, "stream": True}) as r:
                assert r.status_code == 200
                next(r.iter_raw())
        deadline = time.monotonic() + 3
        while not engine.aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.aborted == engine.started and engine.finished == []
        with httpx.Client(base_url=server.url) as client:  # the server is still fine
            assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200



async def test_stalled_reader_is_dropped_and_aborted():
    """A client that stops reading (socket buffer full: `send` blocks) is cut off after send_timeout_s."""
    app, engine = build_test_app(FakeEngine(reply="x" * 1000, step_s=0.001), send_timeout_s=0.2)
    t0 = time.monotonic()
    call = AsgiCall(app, "/v1/chat/completions", {"messages": USER, "stream": True}, stall_after_first_body=True)
    await asyncio.wait_for(call.task, 3.0)
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert len(engine.started) == 1 and engine.aborted == engine.started
