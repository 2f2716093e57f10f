"""OpenAI routes against the fake engine: SSE bytes, usage chunk, finish_reason placement, n fan-out,
logprobs, stop, unknown fields, model ids."""
from __future__ import annotations

import json

import pytest

from tests.integration.fake_engine import FakeEngine, asgi_client, build_test_app

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def frames(body: bytes) -> list[bytes]:
    """Split an SSE body on blank lines, asserting LF-only framing and that it ends with a blank line."""
    assert b"\r" not in body
    assert body.endswith(b"\n\n")
    return body[:-2].split(b"\n\n")


def payloads(body: bytes) -> list[dict]:
    out = frames(body)
    assert out[-1] == b"data: [DONE]"
    assert all(f.startswith(b"data: ") and b"\n" not in f for f in out)
    return [json.loads(f[len(b"data: "):]) for f in out[:-1]]


@pytest.fixture
async def client():
    app, engine = build_test_app()
    async with asgi_client(app) as c:
        c.engine = engine
        yield c


async def test_chat_stream_exact_bytes(client):
    r = await client.post(CHAT, json={"model": "fake-model", "messages": USER, "max_tokens": 3, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    first = payloads(r.content)[0]
    rid, created = first["id"], first["created"]

    def chunk(delta, finish):
        return ('data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":"fake-model",'
                '"choices":[{"index":0,"delta":%s,"logprobs":null,"finish_reason":%s}]}\n\n'
                % (rid, created, json.dumps(delta, separators=(",", ":")), json.dumps(finish))).encode()
    expected = (chunk({"role": "assistant", "content": "P"}, None) + chunk({"content": "a"}, None)
                + chunk({"content": "r"}, "length") + b"data: [DONE]\n\n")
    assert r.content == expected


async def test_chat_stream_usage_chunk_before_done(client):
    r = await client.post(CHAT, json={"messages": USER, "max_tokens": 4, "stream": True,
                                      "stream_options": {"include_usage": True}})
    chunks = payloads(r.content)
    assert all(c["usage"] is None for c in chunks[:-1])  # key present, null
    last = chunks[-1]
    assert last["choices"] == []
    prompt_len = len(client.engine.prompts[f"{last['id']}-0"])
    assert last["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 4, "total_tokens": prompt_len + 4,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1


async def test_chat_stream_without_usage_has_no_usage_key(client):
    r = await client.post(CHAT, json={"messages": USER, "max_tokens": 2, "stream": True})
    assert all("usage" not in c for c in payloads(r.content))


async def test_continuous_usage_stats(client):
    r = await client.post(CHAT, json={"messages": USER, "max_tokens": 3, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    chunks = payloads(r.content)
    assert [c["usage"]["completion_tokens"] for c in chunks[:-1]] == [1, 2, 3]


async def test_finish_reason_only_on_last_chunk_and_role_only_on_first(client):
    r = await client.post(CHAT, json={"messages": USER, "stream": True})
    chunks = payloads(r.content)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert ["role" in c["choices"][0]["delta"] for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == client.engine.reply


async def test_chat_non_stream(client):
    r = await client.post(CHAT, json={"messages": USER, "max_completion_tokens": 5})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Paris",
                                                        "refusal": None},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_cached_tokens_reported():
    app, _ = build_test_app(FakeEngine(num_cached_tokens=32))
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json={"messages": USER, "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


async def test_n_fans_out_with_suffixed_ids_and_distinct_seeds(client):
    r = await client.post(CHAT, json={"messages": USER, "max_tokens": 2, "n": 3, "seed": 7})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    ids = [f"{body['id']}-{i}" for i in range(3)]
    assert client.engine.started == ids
    assert [client.engine.params[i].seed for i in ids] == [7, 8, 9]
    assert all(client.engine.params[i].n == 1 for i in ids)
    assert body["usage"]["completion_tokens"] == 6


async def test_n_streaming_every_choice_gets_role_and_finish(client):
    r = await client.post(CHAT, json={"messages": USER, "max_tokens": 2, "n": 2, "stream": True})
    chunks = payloads(r.content)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == "length"


async def test_chat_logprobs(client):
    r = await client.post(CHAT, json={"messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["P", "a"]
    assert content[0]["logprob"] == -0.25 and content[0]["bytes"] == [80]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["P", "x"]
    assert client.engine.params[f"{r.json()['id']}-0"].logprobs == 2


async def test_completions_stream_and_logprobs(client):
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True, "logprobs": 1,
                                                   "stream_options": {"include_usage": True}})
    chunks = payloads(r.content)
    assert chunks[0]["object"] == "text_completion"
    assert chunks[0]["choices"][0] == {"index": 0, "text": "P", "logprobs": {
        "tokens": ["P"], "token_logprobs": [-0.25], "top_logprobs": [{"P": -0.25}], "text_offset": [0]},
        "finish_reason": None}
    assert chunks[1]["choices"][0]["logprobs"]["text_offset"] == [1]
    assert chunks[1]["choices"][0]["finish_reason"] == "length"
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["completion_tokens"] == 2


async def test_completions_non_stream_token_prompt_and_echo(client):
    r = await client.post("/v1/completions", json={"prompt": [105, 106], "max_tokens": 3, "echo": True})
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "hiPar" and body["usage"]["prompt_tokens"] == 2


async def test_completions_several_prompts(client):
    r = await client.post("/v1/completions", json={"prompt": ["a", "bb"], "max_tokens": 1, "n": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 3


async def test_stop_ignore_eos_and_sampling_fields_reach_the_engine(client):
    r = await client.post(CHAT, json={"messages": USER, "stop": " is", "stop_token_ids": [3], "ignore_eos": True,
                                      "temperature": 0, "top_p": 0.5, "top_k": 4, "min_p": 0.1, "seed": 1})
    assert r.json()["choices"][0]["message"]["content"] == "Paris"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    p = client.engine.params[f"{r.json()['id']}-0"]
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.temperature, p.top_p, p.top_k, p.min_p) == (
        [" is"], [3], True, 0.0, 0.5, 4, 0.1)


async def test_no_max_tokens_means_remaining_context(client):
    r = await client.post(CHAT, json={"messages": USER})
    assert client.engine.params[f"{r.json()['id']}-0"].max_tokens is None


async def test_unknown_fields_are_ignored(client):
    r = await client.post(CHAT, json={"messages": [{"role": "user", "content": "hi", "name": "bob", "extra": 1}],
                                      "max_tokens": 1, "repetition_penalty": 1.0, "frequency_penalty": 0,
                                      "logit_bias": {}, "foo": {"bar": [1]}, "stop": None,
                                      "stream_options": {"include_usage": False, "whatever": 1}})
    assert r.status_code == 200


async def test_content_parts_and_developer_role(client):
    r = await client.post(CHAT, json={"messages": [{"role": "developer", "content": "be brief"},
                                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]}],
                                      "max_tokens": 1})
    prompt = client.engine.tokenizer.decode(client.engine.prompts[f"{r.json()['id']}-0"])
    assert "<|im_start|>system\nbe brief" in prompt and "a\nb" in prompt


async def test_unknown_model_is_404_and_models_list(client):
    r = await client.post(CHAT, json={"model": "nope", "messages": USER})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "fake-model" and models["data"][0]["owned_by"] == "rtserve"


async def test_served_model_names():
    app, _ = build_test_app(served_model_names=("alias-a", "alias-b"))
    async with asgi_client(app) as c:
        assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["alias-a", "alias-b"]
        r = await c.post(CHAT, json={"model": "alias-b", "messages": USER, "max_tokens": 1})
        assert r.json()["model"] == "alias-b"
