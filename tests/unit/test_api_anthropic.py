"""Anthropic /v1/messages against the fake engine: event order (incl. ping), usage and cache fields,
stop reasons, system/content blocks, count_tokens."""
from __future__ import annotations

import json

import pytest

from tests.integration.fake_engine import FakeEngine, asgi_client, build_test_app

MESSAGES = "/v1/messages"
USER = [{"role": "user", "content": "hi"}]


def events(body: bytes) -> list[tuple[str, dict]]:
    assert b"\r" not in body and body.endswith(b"\n\n")
    out = []
    for frame in body[:-2].split(b"\n\n"):
        name_line, data_line = frame.split(b"\n")
        assert name_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        name, data = name_line[7:].decode(), json.loads(data_line[6:])
        assert data["type"] == name
        out.append((name, data))
    return out


@pytest.fixture
async def client():
    app, engine = build_test_app(FakeEngine(num_cached_tokens=16))
    async with asgi_client(app) as c:
        c.engine = engine
        yield c


async def test_stream_event_order_and_payloads(client):
    r = await client.post(MESSAGES, json={"model": "claude-x", "max_tokens": 3, "messages": USER, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.content)
    assert [n for n, _ in evs] == ["message_start", "content_block_start", "ping", "content_block_delta",
                                   "content_block_delta", "content_block_delta", "content_block_stop",
                                   "message_delta", "message_stop"]
    start = evs[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["model"] == "claude-x"
    assert start["stop_reason"] is None and start["id"].startswith("msg_")
    assert {"input_tokens", "output_tokens"} <= set(start["usage"])
    assert evs[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert "".join(e["delta"]["text"] for n, e in evs if n == "content_block_delta") == "Par"
    assert all(e["index"] == 0 and e["delta"]["type"] == "text_delta" for n, e in evs if n == "content_block_delta")
    delta = evs[-2][1]
    prompt_len = len(client.engine.prompts[start["id"]])
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": prompt_len - 16, "output_tokens": 3,
                              "cache_creation_input_tokens": 0, "cache_read_input_tokens": 16}


async def test_periodic_ping_while_waiting():
    app, _ = build_test_app(FakeEngine(reply="ab", step_s=0.12), ping_interval_s=0.05)
    async with asgi_client(app) as c:
        r = await c.post(MESSAGES, json={"max_tokens": 5, "messages": USER, "stream": True})
    names = [n for n, _ in events(r.content)]
    assert names.count("ping") >= 3
    # pings may come anywhere after message_start but never after message_stop
    assert names[0] == "message_start" and names[-1] == "message_stop"
    core = [n for n in names if n != "ping"]
    assert core == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                    "content_block_stop", "message_delta", "message_stop"]


async def test_non_stream_message(client):
    r = await client.post(MESSAGES, json={"model": "m", "max_tokens": 50, "messages": USER})
    body = r.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": client.engine.reply}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"]["cache_read_input_tokens"] == 16
    assert body["usage"]["cache_creation_input_tokens"] == 0


async def test_stop_sequence(client):
    r = await client.post(MESSAGES, json={"max_tokens": 50, "messages": USER, "stop_sequences": [" the"]})
    body = r.json()
    assert body["content"][0]["text"] == "Paris is"
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", " the")


async def test_cache_control_reports_cache_creation(client):
    r = await client.post(MESSAGES, json={
        "max_tokens": 2, "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    usage = r.json()["usage"]
    prompt_len = len(client.engine.prompts[r.json()["id"]])
    assert usage["cache_read_input_tokens"] == 16
    assert usage["cache_creation_input_tokens"] == prompt_len - 16
    assert usage["input_tokens"] + usage["cache_creation_input_tokens"] + usage["cache_read_input_tokens"] == prompt_len


async def test_system_string_and_blocks_and_sampling(client):
    r = await client.post(MESSAGES, json={
        "max_tokens": 2, "system": "be brief", "temperature": 0.5, "top_p": 0.9, "top_k": 5,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "c"}],
        "metadata": {"user_id": "u"}, "unknown_field": True})
    rid = r.json()["id"]
    prompt = client.engine.tokenizer.decode(client.engine.prompts[rid])
    assert prompt.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert "a\nb" in prompt and "<|im_start|>assistant\nok" in prompt
    p = client.engine.params[rid]
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.5, 0.9, 5, 2)


async def test_bad_role_and_image_block_are_400(client):
    r = await client.post(MESSAGES, json={"max_tokens": 2, "messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = await client.post(MESSAGES, json={"max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {}}]}]})
    assert r.status_code == 400


async def test_count_tokens(client):
    r = await client.post("/v1/messages/count_tokens", json={"model": "m", "messages": USER, "system": "s"})
    expected = client.engine.tokenizer.encode(client.engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, *USER]))
    assert r.json() == {"input_tokens": len(expected)}
    assert client.engine.started == []


async def test_any_model_name_is_accepted_and_echoed(client):
    r = await client.post(MESSAGES, json={"model": "claude-sonnet-4-5", "max_tokens": 1, "messages": USER})
    assert r.json()["model"] == "claude-sonnet-4-5"
