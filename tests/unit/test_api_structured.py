"""Structured outputs, tools and sampling controls at the OpenAI edge (fake engine): what reaches the
engine, tool calls read out of the text (whole and streamed), and a 400 naming each bad or refused field."""
from __future__ import annotations

import json

import pytest

from rtserve.structured.tools import render_call
from tests.integration.fake_engine import FakeEngine, asgi_client, build_test_app

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "weather?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL_TEXT = render_call("get_weather", '{"city": "Paris"}')


async def post(body, reply="ok", path=CHAT):
    app, engine = build_test_app(FakeEngine(reply=reply, max_model_len=4096))
    async with asgi_client(app) as c:
        r = await c.post(path, json={"max_tokens": 200, **body})
    return r, engine


def sse(body: bytes) -> list[dict]:
    return [json.loads(f[6:]) for f in body.decode().strip().split("\n\n") if f != "data: [DONE]"]


async def test_params_reach_the_engine():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r, engine = await post({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}, "frequency_penalty": 0.5, "presence_penalty": -1,
        "logit_bias": {"17": 3}, "repetition_penalty": 1.1})
    assert r.status_code == 200, r.text
    (params,) = engine.params.values()
    assert params.structured.kind == "json" and json.loads(params.structured.spec) == schema
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (0.5, -1.0, 1.1)
    assert params.logit_bias == {17: 3.0}


async def test_vllm_structured_outputs_on_completions():
    r, engine = await post({"prompt": "x", "structured_outputs": {"choice": ["a", "b"]}}, path="/v1/completions")
    assert r.status_code == 200
    (params,) = engine.params.values()
    assert params.structured.kind == "choice"


async def test_tool_call_parsed_whole():
    r, engine = await post({"messages": USER, "tools": [WEATHER], "tool_choice": "required"}, reply=CALL_TEXT)
    assert r.status_code == 200, r.text
    (params,) = engine.params.values()
    assert params.structured.kind == "structural_tag"
    prompt = engine.tokenizer.decode(next(iter(engine.prompts.values())))
    assert "<tools>" in prompt and "get_weather" in prompt
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["id"].startswith("call_") and choice["message"]["content"] is None


async def test_tool_call_streamed_as_argument_fragments():
    r, _ = await post({"messages": USER, "tools": [WEATHER], "stream": True}, reply="Hi. " + CALL_TEXT)
    chunks = sse(r.content)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert content == "Hi. "
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'
    assert len(calls) > 2 and all("id" not in tc for tc in calls[1:])  # fragments, one token each
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_history_renders_and_unknown_id_is_refused():
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r, engine = await post({"messages": history, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    prompt = engine.tokenizer.decode(next(iter(engine.prompts.values())))
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt
    history[-1]["tool_call_id"] = "call_2"
    r, _ = await post({"messages": history, "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[2].tool_call_id"


@pytest.mark.parametrize("body,param", [
    ({"audio": {"voice": "x"}}, "audio"),
    ({"prediction": {"type": "image", "content": "x"}}, "prediction.type"),
    ({"prediction": {"type": "content", "content": 5}}, "prediction.content"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"store": True}, "store"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "a("}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= nope"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": "high"}, "presence_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
])
async def test_bad_or_refused_field_is_400_naming_it(body, param):
    r, engine = await post({"messages": USER, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not engine.started


@pytest.mark.parametrize("body,param", [({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"),
                                        ({"tools": [WEATHER]}, "tools")])
async def test_completions_refusals(body, param):
    r, _ = await post({"prompt": "x", **body}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == param


MESSAGES = "/v1/messages"
A_TOOL = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}


def events(body: bytes) -> list[tuple[str, dict]]:
    out = []
    for frame in body.decode().strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


async def test_anthropic_tool_use_whole_and_streamed():
    body = {"messages": USER, "tools": [A_TOOL], "tool_choice": {"type": "any"}}
    r, engine = await post(body, reply="Sure. " + CALL_TEXT, path=MESSAGES)
    assert r.status_code == 200, r.text
    (params,) = engine.params.values()
    assert params.structured.kind == "structural_tag"
    msg = r.json()
    assert msg["stop_reason"] == "tool_use"
    assert msg["content"][0] == {"type": "text", "text": "Sure."}
    assert msg["content"][1]["type"] == "tool_use" and msg["content"][1]["input"] == {"city": "Paris"}
    r, _ = await post({**body, "stream": True}, reply="Sure. " + CALL_TEXT, path=MESSAGES)
    evs = events(r.content)
    starts = [e["content_block"] for name, e in evs if name == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"]
    assert starts[1]["name"] == "get_weather" and starts[1]["id"].startswith("toolu_") and starts[1]["input"] == {}
    partial = "".join(e["delta"]["partial_json"] for name, e in evs
                      if name == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == {"city": "Paris"}
    assert [e["index"] for name, e in evs if name == "content_block_stop"] == [0, 1]
    assert next(e for name, e in evs if name == "message_delta")["delta"]["stop_reason"] == "tool_use"


async def test_anthropic_tool_history_renders():
    history = USER + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}]
    r, engine = await post({"messages": history, "tools": [A_TOOL]}, path=MESSAGES)
    assert r.status_code == 200, r.text
    prompt = engine.tokenizer.decode(next(iter(engine.prompts.values())))
    assert "<tool_response>\nsunny\n</tool_response>" in prompt and '"arguments": {"city": "Paris"}' in prompt
    history[-1]["content"][0]["tool_use_id"] = "toolu_2"
    r, _ = await post({"messages": history, "tools": [A_TOOL]}, path=MESSAGES)
    assert r.status_code == 400 and "tool_use_id" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,needle", [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"mcp_servers": [{}]}, "mcp_servers"),
    ({"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}, "context_management"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({"tools": [A_TOOL], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "input_schema"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
])
async def test_anthropic_refusals_name_the_field(body, needle):
    r, engine = await post({"messages": USER, **body}, path=MESSAGES)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"] and not engine.started


async def test_tool_choice_none_offers_no_tools_and_n_choices_parse_each():
    r, engine = await post({"messages": USER, "tools": [WEATHER], "tool_choice": "none"}, reply=CALL_TEXT)
    assert r.status_code == 200
    (params,) = engine.params.values()
    assert params.structured is None and "<tools>" not in engine.tokenizer.decode(next(iter(engine.prompts.values())))
    assert r.json()["choices"][0]["message"]["content"] == CALL_TEXT  # not parsed: the model was not offered tools
    r, _ = await post({"messages": USER, "tools": [WEATHER], "n": 2, "stream": True}, reply=CALL_TEXT)
    chunks = sse(r.content)
    for index in (0, 1):
        calls = [tc for c in chunks for ch in c["choices"] if ch["index"] == index
                 for tc in ch["delta"].get("tool_calls", [])]
        assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'
        assert len({tc["id"] for tc in calls if "id" in tc}) == 1


async def test_prediction_reaches_the_engine_and_usage_counts_it():
    r, engine = await post({"messages": USER, "prediction": {"type": "content", "content": "ok, fine"},
                            "stream": True, "stream_options": {"include_usage": True}}, reply="ok")
    (params,) = engine.params.values()
    assert params.prediction == engine.tokenizer.encode("ok, fine")
    usage = sse(r.content)[-1]["usage"]
    assert usage["completion_tokens_details"] == {"accepted_prediction_tokens": 2, "rejected_prediction_tokens": 6}
