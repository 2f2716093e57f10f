"""The tool-call format at the OpenAI and Anthropic edges (fake engine, `tool_call_parser` set): the
grammar, the generic prompt and the parsed reply follow the format, whole and streamed."""
from __future__ import annotations

import json

import pytest

from rtserve.api.tool_fields import parse_openai_tools
from rtserve.structured.tool_formats import LLAMA3_JSON, MistralFormat
from tests.integration.fake_engine import FakeEngine, asgi_client, build_test_app

USER = [{"role": "user", "content": "weather?"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
FORMATS = {"llama3_json": (LLAMA3_JSON, "<|python_tag|>" + LLAMA3_JSON.render_call("get_weather", '{"city": "Paris"}')),
           "mistral": (MistralFormat(), MistralFormat().render_call("get_weather", '{"city": "Paris"}'))}


async def post(parser, path, body, reply):
    app, engine = build_test_app(FakeEngine(reply=reply, max_model_len=4096), tool_call_parser=parser)
    async with asgi_client(app) as c:
        r = await c.post(path, json={"max_tokens": 300, **body})
    return r, engine


def sse(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().split("\n") if line.startswith("data: {")]


@pytest.mark.parametrize("parser", FORMATS)
async def test_openai_calls_in_the_models_format(parser):
    fmt, call = FORMATS[parser]
    r, engine = await post(parser, "/v1/chat/completions",
                           {"messages": USER, "tools": [WEATHER], "tool_choice": "required"}, call)
    assert r.status_code == 200, r.text
    (params,) = engine.params.values()
    assert params.structured.spec == fmt.grammar(parse_openai_tools([WEATHER]), "required", True).spec
    prompt = engine.tokenizer.decode(next(iter(engine.prompts.values())))
    assert fmt.system_prompt([]).split("\n")[0] in prompt and "get_weather" in prompt
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]

    r, _ = await post(parser, "/v1/chat/completions", {"messages": USER, "tools": [WEATHER], "stream": True},
                      "Hi. " + call)
    deltas = [c["choices"][0]["delta"] for c in sse(r.content) if c["choices"]]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert "".join(d.get("content") or "" for d in deltas) == "Hi. "
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'
    assert sse(r.content)[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("parser", FORMATS)
async def test_anthropic_tool_use_in_the_models_format(parser):
    _, call = FORMATS[parser]
    body = {"messages": USER, "tools": [{"name": "get_weather", "input_schema": SCHEMA}], "tool_choice": {"type": "any"}}
    r, _ = await post(parser, "/v1/messages", body, call)
    assert r.status_code == 200, r.text
    assert r.json()["stop_reason"] == "tool_use"
    assert [b["input"] for b in r.json()["content"] if b["type"] == "tool_use"] == [{"city": "Paris"}]
    r, _ = await post(parser, "/v1/messages", {**body, "stream": True}, call)
    events = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: ")]
    partial = "".join(e["delta"].get("partial_json", "") for e in events if e["type"] == "content_block_delta")
    assert json.loads(partial) == {"city": "Paris"}
    assert next(e for e in events if e["type"] == "message_delta")["delta"]["stop_reason"] == "tool_use"


def test_tool_call_parser_setting_from_the_command_line():
    from rtserve.api.app import ServerSettings
    from rtserve.api.server import build_parser, settings_from_args
    args = build_parser().parse_args(["--tool-call-parser", "mistral", "--no-batch-api"])
    assert settings_from_args(args).tool_call_parser == "mistral"
    assert build_parser().parse_args([]).tool_call_parser == "auto"
    with pytest.raises(ValueError):
        ServerSettings(tool_call_parser="pythonic")
