"""The `rt` extension through the routes (fake engine): 400s, 429/529 + Retry-After, firm drops as 504,
service_tier mapping, the final `rt` object and Server-Timing."""
from __future__ import annotations

import json
from collections import deque

import pytest

from rtserve.client.async_llm import AdmissionRejected
from rtserve.client.outputs import RequestOutput
from rtserve.client.rt_report import RTTracker
from rtserve.engine.admission import AdmissionDecision
from rtserve.protocol import RTParams
from tests.integration.fake_engine import FakeEngine, asgi_client, build_test_app

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
REJECT = AdmissionRejected(AdmissionDecision(False, 0.9, 0.25, "ttft", "firm request refused: predicted"), "firm")


class ReportingEngine(FakeEngine):
    """Attaches an RTReport to the finished delta, as AsyncLLM does."""

    async def generate(self, prompt_ids, params, request_id, rt=None, arrival_s=None, admitted=False):
        tracker = RTTracker(self.check_admission(len(prompt_ids), rt), 0.0)
        async for out in super().generate(prompt_ids, params, request_id):
            tracker.on_tokens(len(out.token_ids), 0.01 * out.num_output_tokens)
            if out.finished:
                out.rt = tracker.finish(0.1, out.finish_reason)
            yield out


class DroppingEngine(FakeEngine):
    """Every request is dropped for its TTFT deadline before its first token."""

    async def generate(self, prompt_ids, params, request_id, rt=None, arrival_s=None, admitted=False):
        yield RequestOutput(request_id, finished=True, finish_reason="deadline",
                            error="deadline: ttft budget of 300 ms passed while queued")


async def post(engine, path, body):
    app, _ = build_test_app(engine)
    async with asgi_client(app) as c:
        return await c.post(path, json=body)


@pytest.mark.parametrize("stream", [False, True])
async def test_refusal_is_429_with_retry_after_before_any_byte(stream):
    r = await post(FakeEngine(reject_with=REJECT), CHAT, {"model": "fake-model", "messages": USER, "stream": stream,
                                                          "rt": {"class": "firm", "ttft_ms": 100}})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.headers["retry-after-ms"] == "250"
    assert r.json()["error"]["code"] == "deadline_unattainable" and r.json()["error"]["type"] == "rate_limit_error"


async def test_anthropic_refusal_is_529_overloaded():
    r = await post(FakeEngine(reject_with=REJECT), "/v1/messages",
                   {"model": "fake-model", "max_tokens": 5, "messages": USER, "stream": True})
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"
    assert r.headers["retry-after-ms"] == "250"


async def test_hard_and_bad_fields_are_400_and_service_tier_maps_to_a_class():
    engine = FakeEngine()
    r = await post(engine, CHAT, {"model": "fake-model", "messages": USER, "rt": {"class": "hard"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rt.class"
    assert "garbage collector" in r.json()["error"]["message"]
    r = await post(engine, "/v1/completions", {"model": "fake-model", "prompt": "x", "rt": {"itl_ms": 0}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rt.itl_ms"
    r = await post(engine, CHAT, {"model": "fake-model", "messages": USER, "service_tier": "bogus"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "service_tier"
    for tier, cls in (("priority", "firm"), ("flex", "batch"), ("auto", "soft")):
        assert (await post(engine, CHAT, {"model": "fake-model", "messages": USER, "service_tier": tier})).status_code == 200
        assert engine.rt_params[-1].rt_class == cls
    r = await post(engine, "/v1/messages", {"model": "fake-model", "max_tokens": 5, "messages": USER,
                                            "rt": {"class": "firm", "ttft_ms": 250}})
    assert r.status_code == 200 and engine.rt_params[-1].ttft_s == 0.25


async def test_final_chunk_and_body_carry_rt_and_server_timing():
    r = await post(ReportingEngine(), CHAT, {"model": "fake-model", "messages": USER, "max_tokens": 3,
                                             "stream": True, "rt": {"class": "firm"}})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "rt" not in chunks[0] and chunks[-1]["rt"]["class"] == "firm" and chunks[-1]["choices"] == []
    assert chunks[-1]["rt"]["budget"] == {"ttft_ms": 500.0, "itl_ms": 50.0, "deadline_ms": None}
    r = await post(ReportingEngine(), CHAT, {"model": "fake-model", "messages": USER, "max_tokens": 3})
    assert r.json()["rt"]["class"] == "soft" and r.headers["server-timing"].startswith("ttft;dur=")
    r = await post(ReportingEngine(), "/v1/messages", {"model": "fake-model", "max_tokens": 3, "messages": USER,
                                                       "stream": True})
    delta = next(json.loads(line[6:]) for line in r.text.splitlines()
                 if line.startswith("data: {") and '"message_delta"' in line)
    assert delta["rt"]["class"] == "soft"


@pytest.mark.parametrize("path,body", [
    (CHAT, {"messages": USER, "stream": True}), (CHAT, {"messages": USER}),
    ("/v1/messages", {"messages": USER, "max_tokens": 5, "stream": True}),
    ("/v1/messages", {"messages": USER, "max_tokens": 5})])
async def test_firm_drop_before_the_first_token_is_a_504_before_any_byte(path, body):
    r = await post(DroppingEngine(), path, {"model": "fake-model", **body, "rt": {"class": "firm"}})
    assert r.status_code == 504 and "ttft budget of 300 ms" in r.text and r.headers["x-should-retry"] == "false"


async def test_realtime_rt_refusal_hard_and_report():
    import asyncio

    from websockets.asyncio.client import connect

    from tests.integration.fake_engine import LiveServer

    async def recv(ws) -> dict:
        return json.loads(await asyncio.wait_for(ws.recv(), 5))

    async def until(ws, event_type):
        while (event := await recv(ws))["type"] != event_type:
            pass
        return event

    item = json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    engine = ReportingEngine(reply="Hi.", step_s=0.002)
    app, _ = build_test_app(engine)
    with LiveServer(app) as server:
        async with connect(server.url.replace("http://", "ws://") + "/v1/realtime?model=fake-model") as ws:
            await recv(ws)
            await ws.send(item)
            await recv(ws)
            await ws.send(json.dumps({"type": "response.create", "response": {"rt": {"class": "hard"}}}))
            err = await until(ws, "error")
            assert err["error"]["param"] == "response.rt.class" and "firm" in err["error"]["message"]
            await ws.send(json.dumps({"type": "response.create", "response": {"rt": {"class": "firm"}}}))
            done = await until(ws, "response.done")
            assert done["response"]["status"] == "completed" and done["response"]["rt"]["class"] == "firm"
            engine.reject_with = REJECT
            await ws.send(json.dumps({"type": "response.create", "response": {"rt": {"class": "firm"}}}))
            err = await until(ws, "error")
            assert err["error"]["code"] == "deadline_unattainable" and err["error"]["type"] == "rate_limit_error"
            done = await until(ws, "response.done")
            assert done["response"]["status"] == "failed"
            assert done["response"]["status_details"]["error"]["retry_after_ms"] == 250


def overloaded_client(**rt_kw):
    """A real engine client (no engine core) whose latest snapshot has 7,000 prompt tokens waiting:
    1,420 ms to a first token on the fake cost model."""
    import asyncio

    from rtserve.client.async_llm import AsyncLLM
    from rtserve.config import EngineConfig, RTConfig
    from rtserve.engine.rt_params import ON_TIME
    from rtserve.protocol import EngineStats, QueueSnapshot
    from tests.integration.fake_engine import FakeTokenizer
    from tests.unit.rt_helpers import FAKE_COEFFS

    llm = AsyncLLM(EngineConfig(rt=RTConfig(**rt_kw)), tokenizer=FakeTokenizer())
    llm.max_model_len = 512
    llm._loop = asyncio.get_running_loop()
    snap = QueueSnapshot(timestamp=0.0, policy="deadline", waiting=[((ON_TIME, 0.0), 7000)], cost_coeffs=FAKE_COEFFS,
                         cost_calibrated=True, prefill_token_budget=100, num_free_slots=64, num_requests_added=0)
    llm.stats = EngineStats(queue=snap)
    return llm


@pytest.mark.parametrize("stream", [False, True])
async def test_soft_request_past_the_overload_bound_is_refused_with_reject(stream):
    llm = overloaded_client(soft_overload="reject", soft_overload_bound_s=0.2)
    app, _ = build_test_app(llm)
    soft = {"class": "soft", "ttft_ms": 300}
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json={"model": "rtserve-model", "messages": USER, "stream": stream, "rt": soft})
        # OpenAI: 429 rate_limit_error, as a firm refusal; Retry-After is the excess over the bound (~0.9 s).
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert 800 < int(r.headers["retry-after-ms"]) <= 1000
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert (err["type"], err["code"]) == ("rate_limit_error", "deadline_unattainable")
        assert "soft request refused" in err["message"] and "bound of 200 ms" in err["message"]
        r = await c.post("/v1/messages", json={"model": "rtserve-model", "max_tokens": 5, "messages": USER,
                                               "stream": stream, "rt": soft})
        assert r.status_code == 529 and int(r.headers["retry-after-ms"]) > 800
        body = r.json()
        assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
        assert "soft request refused" in body["error"]["message"]
        metrics = (await c.get("/metrics")).text
    assert 'rtserve:rt_rejections_total{model_name="rtserve-model",reason="ttft",rt_class="soft"} 2' in metrics
    assert llm._pending == deque() and llm._queues == {}  # nothing was sent to the engine


async def test_serve_late_admits_the_same_soft_request():
    llm = overloaded_client()
    assert llm.check_admission(10, RTParams("soft", ttft_s=0.3)).rt_class == "soft"
    llm = overloaded_client(soft_overload="reject")  # 1,120 ms late: past the default 1 s bound
    with pytest.raises(AdmissionRejected):
        llm.check_admission(10, RTParams("soft", ttft_s=0.3))
    assert llm.check_admission(10, RTParams("batch")).rt_class == "batch"
