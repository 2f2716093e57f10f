"""Error shapes and statuses: malformed bodies, wrong types, caps naming the field, auth, body limit,
engine failures (before the stream: 500/503; after: in-band)."""
from __future__ import annotations

import json

import pytest

from rtserve.config import LimitsConfig
from tests.integration.fake_engine import FakeEngine, asgi_client, build_test_app

CHAT, MESSAGES = "/v1/chat/completions", "/v1/messages"
USER = [{"role": "user", "content": "hi"}]


def assert_openai_error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_anthropic_error(r, status: int, error_type: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type and body["error"]["message"]


@pytest.fixture
async def client():
    app, engine = build_test_app(FakeEngine(max_model_len=256, limits=LimitsConfig(max_tokens_cap=64, max_n=4)))
    async with asgi_client(app) as c:
        c.engine = engine
        yield c


@pytest.mark.parametrize("body", [b"{", b"", b"nul", b"[1, 2]", b'"text"', b"42", b'{"messages": [}'])
async def test_malformed_json_is_400(client, body):
    err = assert_openai_error(await client.post(CHAT, content=body), 400)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b'{"messages": [{"role": "user", "content": "\xc3("}]}',
                                  "{\"messages\": \"\u00e9\"}".encode("latin-1")])
async def test_invalid_utf8_is_400(client, body):
    assert assert_openai_error(await client.post(CHAT, content=body), 400)["code"] == "invalid_encoding"


@pytest.mark.parametrize("body,param", [
    ({"messages": None}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [123]}, "messages[0]"),
    ({"messages": [{}]}, "messages[0].role"),
    ({"messages": [{"role": 123, "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 123}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": USER, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": USER, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "temperature": -1}, "temperature"),
    ({"messages": USER, "top_p": 7}, "top_p"),
    ({"messages": USER, "top_k": -5}, "top_k"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
])
async def test_wrong_types_and_values_are_400_naming_the_field(client, body, param):
    err = assert_openai_error(await client.post(CHAT, json=body), 400, param)
    assert err["type"] == "invalid_request_error"


async def test_lone_surrogate_in_content_is_400_not_500(client):
    r = await client.post(CHAT, content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    assert_openai_error(r, 400, "messages")


@pytest.mark.parametrize("body,param", [
    ({"messages": USER, "max_tokens": 65}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 65}, "max_completion_tokens"),
    ({"messages": USER, "n": 5}, "n"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x" * 300}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 60}, "max_tokens"),
])
async def test_caps_are_400_naming_the_field(client, body, param):
    assert_openai_error(await client.post(CHAT, json=body), 400, param)
    assert client.engine.started == []


async def test_completion_caps_name_prompt(client):
    assert_openai_error(await client.post("/v1/completions", json={"prompt": "x" * 300}), 400, "prompt")
    assert_openai_error(await client.post("/v1/completions", json={"prompt": [999]}), 400, "prompt")
    assert_openai_error(await client.post("/v1/completions", json={"prompt": []}), 400, "prompt")
    assert_openai_error(await client.post("/v1/completions", json={"prompt": 5}), 400, "prompt")


async def test_anthropic_shapes(client):
    assert_anthropic_error(await client.post(MESSAGES, content=b"{"), 400, "invalid_request_error")
    assert_anthropic_error(await client.post(MESSAGES, json={"messages": USER}), 400, "invalid_request_error")
    assert_anthropic_error(await client.post(MESSAGES, json={"max_tokens": 5, "messages": []}), 400,
                           "invalid_request_error")
    assert_anthropic_error(await client.post(MESSAGES, json={"max_tokens": 65, "messages": USER}), 400,
                           "invalid_request_error")
    assert_anthropic_error(await client.post(MESSAGES, content=b"\xff"), 400, "invalid_request_error")
    assert_anthropic_error(await client.post("/v1/messages/nope", json={}), 404, "not_found_error")
    assert_anthropic_error(await client.get(MESSAGES), 405, "invalid_request_error")


async def test_unknown_route_and_method_use_openai_shape(client):
    assert_openai_error(await client.get("/v1/nope"), 404)
    assert_openai_error(await client.get(CHAT), 405)


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/ready", "/tokenize", "/detokenize", CHAT,
                                  "/v1/completions", MESSAGES, "/v1/messages/count_tokens", "/v1/nope"])
async def test_api_key_required_everywhere_but_health(path):
    app, _ = build_test_app(api_key="sekret")
    async with asgi_client(app) as c:
        method = c.get if path in ("/v1/models", "/metrics", "/ready", "/v1/nope") else c.post
        r = await method(path, **({} if method == c.get else {"json": {}}))
        assert r.status_code == 401
        if path.startswith("/v1/messages"):
            assert_anthropic_error(r, 401, "authentication_error")
        else:
            assert_openai_error(r, 401)["type"] == "authentication_error"
        bad = await method(path, headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401
        assert (await c.get("/health")).status_code == 200
        for headers in ({"Authorization": "Bearer sekret"}, {"x-api-key": "sekret"}):
            ok = await method(path, headers=headers, **({} if method == c.get else {"json": {}}))
            assert ok.status_code != 401


async def test_body_limit_content_length_and_streamed_body():
    app, engine = build_test_app(max_body_bytes=1000)
    async with asgi_client(app) as c:
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]}).encode()
        assert_openai_error(await c.post(CHAT, content=big), 413)

        async def chunked():  # no Content-Length: counted while streaming
            for i in range(0, len(big), 100):
                yield big[i:i + 100]
        assert_openai_error(await c.post(CHAT, content=chunked()), 413)
        assert_anthropic_error(await c.post(MESSAGES, content=chunked()), 413, "request_too_large")
        assert (await c.post(CHAT, json={"messages": USER, "max_tokens": 1})).status_code == 200
    assert len(engine.started) == 1


async def test_engine_dead_before_request_is_503():
    app, engine = build_test_app(FakeEngine(is_dead=True))
    async with asgi_client(app) as c:
        assert_openai_error(await c.post(CHAT, json={"messages": USER}), 503)
        assert_openai_error(await c.post(CHAT, json={"messages": USER, "stream": True}), 503)
        assert (await c.post(MESSAGES, json={"max_tokens": 3, "messages": USER})).status_code == 503
        assert (await c.get("/health")).status_code == 503


async def test_engine_dies_mid_request_non_stream_is_503():
    app, _ = build_test_app(FakeEngine(fail_after=2))
    async with asgi_client(app) as c:
        err = assert_openai_error(await c.post(CHAT, json={"messages": USER}), 503)
        assert "EngineDeadError" in err["message"]


async def test_engine_error_output_non_stream_is_500():
    app, _ = build_test_app(FakeEngine(error_after=1))
    async with asgi_client(app) as c:
        assert "simulated failure" in assert_openai_error(await c.post(CHAT, json={"messages": USER}), 500)["message"]
        r = await c.post(MESSAGES, json={"max_tokens": 5, "messages": USER})
        assert_anthropic_error(r, 500, "api_error")


async def test_mid_stream_failure_is_in_band_then_done():
    app, _ = build_test_app(FakeEngine(fail_after=2))
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json={"messages": USER, "stream": True})
    assert r.status_code == 200
    frames = r.content[:-2].split(b"\n\n")
    assert frames[-1] == b"data: [DONE]"
    err = json.loads(frames[-2][len(b"data: "):])["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    assert [json.loads(f[6:])["choices"][0]["delta"]["content"] for f in frames[:-2]] == ["P", "a"]


async def test_anthropic_mid_stream_failure_is_error_event():
    app, _ = build_test_app(FakeEngine(error_after=1))
    async with asgi_client(app) as c:
        r = await c.post(MESSAGES, json={"max_tokens": 5, "messages": USER, "stream": True})
    last = r.content[:-2].split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ")
    assert json.loads(last.split(b"data: ", 1)[1]) == {
        "type": "error", "error": {"type": "api_error", "message": "The engine failed this request: simulated failure"}}
