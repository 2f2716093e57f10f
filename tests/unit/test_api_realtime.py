"""/v1/realtime WebSocket (text subset of the OpenAI Realtime events) on a real uvicorn, fake engine."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from rtserve.structured.tools import render_call
from tests.integration.fake_engine import FakeEngine, LiveServer, build_test_app

RESPONSE_EVENTS = ["response.created", "response.output_item.added", "response.content_part.added"]
TAIL_EVENTS = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
               "response.done"]


def ws_url(server: LiveServer) -> str:
    return server.url.replace("http://", "ws://") + "/v1/realtime?model=fake-model"


async def recv(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def recv_until(ws, event_type: str) -> list[dict]:
    events = []
    while not events or events[-1]["type"] != event_type:
        events.append(await recv(ws))
    return events


def user_item(text: str) -> str:
    return json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})


@pytest.fixture
def server_and_engine():
    app, engine = build_test_app(FakeEngine(reply="Hi there.", step_s=0.002))
    with LiveServer(app) as server:
        yield server, engine


async def test_two_turns_keep_the_conversation(server_and_engine):
    server, engine = server_and_engine
    async with connect(ws_url(server)) as ws:
        created = await recv(ws)
        assert created["type"] == "session.created" and created["session"]["output_modalities"] == ["text"]
        await ws.send(json.dumps({"type": "session.update",
                                  "session": {"type": "realtime", "instructions": "Be brief."}}))
        updated = await recv(ws)
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Be brief."
        await ws.send(user_item("hello"))
        item_created = await recv(ws)
        assert item_created["type"] == "conversation.item.created" and item_created["previous_item_id"] is None
        await ws.send(json.dumps({"type": "response.create"}))
        events = await recv_until(ws, "response.done")
        types = [e["type"] for e in events]
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        assert types == RESPONSE_EVENTS + ["response.output_text.delta"] * len(deltas) + TAIL_EVENTS
        assert "".join(d["delta"] for d in deltas) == "Hi there."
        assert events[-4]["text"] == "Hi there."
        done = events[-1]["response"]
        assert done["status"] == "completed" and done["id"] == events[0]["response"]["id"]
        assert done["usage"]["output_tokens"] == len("Hi there.") and done["usage"]["input_tokens"] > 0
        assert done["output"][0]["content"] == [{"type": "output_text", "text": "Hi there."}]
        assert len({e["event_id"] for e in events}) == len(events)

        await ws.send(user_item("again"))
        assert (await recv(ws))["previous_item_id"] == done["output"][0]["id"]
        await ws.send(json.dumps({"type": "response.create"}))
        second = (await recv_until(ws, "response.done"))[-1]["response"]
        assert second["status"] == "completed"
    prompt = engine.tokenizer.decode(engine.prompts[second["id"]])
    assert prompt.index("Be brief.") < prompt.index("hello") < prompt.index("Hi there.") < prompt.index("again")


async def test_cancel_mid_stream_aborts_within_a_step():
    app, engine = build_test_app(FakeEngine(reply="x" * 5000, step_s=0.01))
    with LiveServer(app) as server:
        async with connect(ws_url(server)) as ws:
            await recv(ws)
            await ws.send(user_item("go"))
            await recv(ws)
            await ws.send(json.dumps({"type": "response.create"}))
            await recv_until(ws, "response.output_text.delta")
            t0 = time.monotonic()
            await ws.send(json.dumps({"type": "response.cancel"}))
            events = await recv_until(ws, "response.done")
            latency_s = time.monotonic() - t0
            assert events[-1]["response"]["status"] == "cancelled"
            assert [e["type"] for e in events if not e["type"].endswith(".delta")] == TAIL_EVENTS
            assert latency_s < 0.5
            assert engine.aborted == engine.started
            # the session is still usable, with the partial answer in the conversation
            await ws.send(json.dumps({"type": "response.cancel"}))
            assert (await recv(ws))["type"] == "error"


async def test_bad_events_get_error_events_and_session_survives(server_and_engine):
    server, engine = server_and_engine
    async with connect(ws_url(server)) as ws:
        await recv(ws)
        for bad, param in [("not json", None), (json.dumps([1]), "type"), (json.dumps({"no": "type"}), "type"),
                           (json.dumps({"type": "bogus.event", "event_id": "c1"}), "type"),
                           (json.dumps({"type": "response.cancel"}), "response_id"),
                           (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "x",
                                                                                     "content": []}}), "item.role"),
                           (json.dumps({"type": "session.update", "session": {"output_modalities": ["audio"]}}),
                            "session.output_modalities"),
                           (json.dumps({"type": "session.update", "session": {"max_output_tokens": -1}}),
                            "session.max_output_tokens")]:
            await ws.send(bad)
            err = await recv(ws)
            assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", err
            assert err["error"]["param"] == param
        await ws.send(b"\x00binary")
        assert (await recv(ws))["type"] == "error"
        await ws.send(json.dumps({"type": "response.create"}))  # no user message yet
        events = await recv_until(ws, "response.done")
        assert events[-1]["response"]["status"] == "failed"
        await ws.send(user_item("ok"))
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 2}}))
        done = (await recv_until(ws, "response.done"))[-1]["response"]
        assert done["status"] == "incomplete" and done["usage"]["output_tokens"] == 2


async def test_socket_drop_mid_response_aborts():
    app, engine = build_test_app(FakeEngine(reply="x" * 5000, step_s=0.01))
    with LiveServer(app) as server:
        async with connect(ws_url(server)) as ws:
            await recv(ws)
            await ws.send(user_item("go"))
            await ws.send(json.dumps({"type": "response.create"}))
            await recv_until(ws, "response.output_text.delta")
        deadline = time.monotonic() + 3
        while not engine.aborted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.aborted == engine.started


async def test_api_key_on_upgrade():
    app, _ = build_test_app(FakeEngine(), api_key="k")
    with LiveServer(app) as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(server)):
                pass
        assert info.value.response.status_code == 401
        async with connect(ws_url(server), additional_headers={"Authorization": "Bearer k"}) as ws:
            assert (await recv(ws))["type"] == "session.created"


async def test_openai_sdk_realtime_client_parses_every_event():
    import openai

    app, _ = build_test_app(FakeEngine(reply="Hello!"))
    with LiveServer(app) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
        async with client.realtime.connect(model="fake-model") as conn:
            await conn.session.update(session={"type": "realtime", "instructions": "Be kind."})
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "hey"}]})
            await conn.response.create()
            names, text = [], ""
            async for event in conn:
                names.append(type(event).__name__)
                text += getattr(event, "delta", "") if event.type == "response.output_text.delta" else ""
                if event.type == "response.done":
                    assert event.response.status == "completed" and event.response.usage.output_tokens == 6
                    break
        await client.close()
    assert text == "Hello!"
    assert names[:4] == ["SessionCreatedEvent", "SessionUpdatedEvent", "ConversationItemCreatedEvent",
                         "ResponseCreatedEvent"]


async def test_bad_tool_fields_and_unserved_fields_get_error_events(server_and_engine):
    server, engine = server_and_engine
    array = {"type": "function", "name": "f", "parameters": {"type": "array"}}
    async with connect(ws_url(server)) as ws:
        await recv(ws)
        for event, param in [({"type": "session.update", "session": {"tools": [array]}}, "session.tools[0].parameters"),
                             ({"type": "session.update", "session": {"tool_choice": {"type": "function", "name": "g"}}},
                              "session.tool_choice"),
                             ({"type": "session.update", "session": {"audio": {"output": {"voice": "x"}}}},
                              "session.audio"),
                             ({"type": "response.create", "response": {"conversation": "none"}},
                              "response.conversation"),
                             ({"type": "conversation.item.create", "item": {
                                 "type": "function_call_output", "call_id": "nope", "output": "x"}}, "item.call_id"),
                             ({"type": "conversation.item.create", "item": {
                                 "type": "function_call", "call_id": "c1", "name": "f", "arguments": "[1]"}},
                              "item.arguments")]:
            await ws.send(json.dumps({**event, "event_id": "ev_c"}))
            err = await recv(ws)
            assert err["type"] == "error" and err["error"]["param"] == param, err
            assert err["error"]["event_id"] == "ev_c"
        assert not engine.prompts  # nothing reached the engine


async def test_tool_call_loop():
    call = render_call("get_weather", '{"city": "Paris"}')
    app, engine = build_test_app(FakeEngine(reply="Let me check. " + call, step_s=0.001, max_model_len=4096))
    tool = {"type": "function", "name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    with LiveServer(app) as server:
        async with connect(ws_url(server)) as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "session.update", "session": {"tools": [tool]}}))
            updated = await recv(ws)
            assert updated["session"]["tools"][0]["name"] == "get_weather"
            await ws.send(user_item("Weather in Paris?"))
            await recv(ws)
            await ws.send(json.dumps({"type": "response.create"}))
            events = await recv_until(ws, "response.done")
            types = [e["type"] for e in events]
            text_deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
            args = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
            assert text_deltas == "Let me check. " and args == '{"city": "Paris"}'
            added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
            assert [i["type"] for i in added] == ["message", "function_call"]
            done_args = next(e for e in events if e["type"] == "response.function_call_arguments.done")
            assert done_args["name"] == "get_weather" and done_args["output_index"] == 1
            assert types.index("response.output_text.done") < types.index("response.output_item.added", 4)
            response = events[-1]["response"]
            assert response["status"] == "completed"
            fc = response["output"][1]
            assert fc["type"] == "function_call" and fc["status"] == "completed" and fc["arguments"] == args
            (params,) = [p for p in engine.params.values()]
            assert params.structured.kind == "structural_tag"

            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": fc["call_id"], "output": "sunny"}}))
            assert (await recv(ws))["item"]["type"] == "function_call_output"
            await ws.send(json.dumps({"type": "response.create", "response": {"tool_choice": "none"}}))
            second = (await recv_until(ws, "response.done"))[-1]["response"]
            assert second["output"][0]["type"] == "message"
    prompt = engine.tokenizer.decode(engine.prompts[second["id"]])
    assert prompt.index("Weather in Paris?") < prompt.index('"arguments": {"city": "Paris"}') < prompt.index("sunny")
    assert engine.params[second["id"]].structured is None


async def test_openai_sdk_realtime_client_reads_a_function_call():
    import openai

    call = render_call("get_time", "{}")
    app, _ = build_test_app(FakeEngine(reply=call, max_model_len=4096))
    tool = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
    with LiveServer(app) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
        async with client.realtime.connect(model="fake-model") as conn:
            await conn.session.update(session={"type": "realtime", "tools": [tool], "tool_choice": "required"})
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "time?"}]})
            await conn.response.create()
            names = []
            async for event in conn:
                names.append(type(event).__name__)
                if event.type == "response.function_call_arguments.done":
                    assert event.name == "get_time" and event.arguments == "{}"
                if event.type == "response.done":
                    (item,) = event.response.output
                    assert item.type == "function_call" and item.name == "get_time" and item.call_id
                    break
        await client.close()
    assert "ResponseFunctionCallArgumentsDoneEvent" in names and "ResponseOutputItemAddedEvent" in names


async def test_a_call_cut_by_max_output_tokens_is_incomplete_and_cannot_be_answered():
    call = render_call("get_weather", '{"city": "Paris"}')
    app, engine = build_test_app(FakeEngine(reply=call, max_model_len=4096))
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    with LiveServer(app) as server:
        async with connect(ws_url(server)) as ws:
            await recv(ws)
            await ws.send(json.dumps({"type": "session.update", "session": {"tools": [tool]}}))
            await recv(ws)
            await ws.send(user_item("Weather?"))
            await recv(ws)
            await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 60}}))
            done = (await recv_until(ws, "response.done"))[-1]["response"]
            (item,) = done["output"]
            assert done["status"] == "incomplete" and item["type"] == "function_call"
            assert item["status"] == "incomplete" and item["arguments"] == '{"city": "P'
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": item["call_id"], "output": "sunny"}}))
            assert (await recv(ws))["error"]["param"] == "item.call_id"
            await ws.send(user_item("Again?"))
            await recv(ws)
            await ws.send(json.dumps({"type": "response.create", "response": {"tool_choice": "none"}}))
            assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] == "completed"
