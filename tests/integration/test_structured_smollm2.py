"""Structured outputs and tool calling on a real `rtserve serve` (SmolLM2-135M) through the official SDKs:
constrained outputs validate against their schemas, tool calls always parse, predicted outputs are
counted in usage. The model is too small to choose tools
well; the guarantees checked here are structural."""
from __future__ import annotations

import concurrent.futures
import json
import re

import anthropic
import jsonschema_rs
import openai
import pydantic
import pytest

try:
    from tests.integration.fake_engine import ServerProcess
except ImportError:  # tests/integration not importable as a package
    from fake_engine import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
GREEDY = {"temperature": 0}  # the anthropic SDK takes it as a body field
PERSON = [{"role": "user", "content": "Describe a person as JSON."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20},
                                                "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string", "maxLength": 10}}, "required": ["zone"]}}}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "nick": {"type": "string", "maxLength": 8},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["zip"], "additionalProperties": False},
        "extra": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}},
     "required": ["tags", "score", "address", "extra"], "additionalProperties": False},
]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=120)


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--no-rt-calibrate") as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_sdk_parse_returns_the_model(oai):
    completion = oai.chat.completions.parse(model=MODEL, messages=PERSON, response_format=Person, max_tokens=60,
                                            temperature=0)
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(completion.choices[0].message.parsed, Person)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_outputs_validate(oai, schema):
    for seed in (None, 1, 2):  # greedy, then two samples
        r = oai.chat.completions.create(
            model=MODEL, messages=PERSON, max_tokens=120, temperature=0 if seed is None else 1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema_rs.validate(schema, json.loads(r.choices[0].message.content))


def test_regex_choice_and_json_object(oai):
    r = oai.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=0.8, seed=3,
                               extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Yes or no?"}], max_tokens=5,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")
    r = oai.chat.completions.create(model=MODEL, messages=PERSON, max_tokens=100, temperature=0,
                                    response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_required_and_named_tool_calls_parse(oai):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oai.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME], tool_choice="required",
                                    max_tokens=80, temperature=0, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    # Parallel calls: this model keeps calling until max_tokens; the complete calls are listed.
    parallel = oai.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME], max_tokens=80,
                                           tool_choice="required", temperature=0).choices[0]
    assert parallel.finish_reason in ("tool_calls", "length") and parallel.message.tool_calls
    for call in choice.message.tool_calls + parallel.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments), dict)
    r = oai.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME], max_tokens=80, temperature=0,
                                    tool_choice={"type": "function", "function": {"name": "get_time"}},
                                    parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and "zone" in json.loads(call.function.arguments)


def test_streamed_tool_call_and_two_turn_loop(oai):
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    stream = oai.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required",
                                         max_tokens=80, temperature=0, stream=True, parallel_tool_calls=False)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:  # the closing chunk (rt report)
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    call = calls[0]
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"]
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"}]
    r = oai.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                    max_tokens=20, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_constrained_and_unconstrained_together(oai):
    """Concurrent constrained, tool and plain requests all keep their guarantees. (That the plain one's
    tokens are those it gets alone is checked exactly on the fp32 path, test_structured_spec_smollm2.py:
    here, on the quantized fast path, a batch shape may part it from them at a near tie.)"""
    plain = dict(model=MODEL, messages=[{"role": "user", "content": "Name three fruits."}], max_tokens=24,
                 temperature=0)
    alone = oai.chat.completions.create(**plain).choices[0].message.content
    constrained = dict(model=MODEL, messages=PERSON, max_tokens=60, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0]}})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(oai.chat.completions.create, **constrained) for _ in range(2)]
        futures.append(pool.submit(oai.chat.completions.create, **plain))
        futures.append(pool.submit(oai.chat.completions.create, tools=[WEATHER], tool_choice="required",
                                   parallel_tool_calls=False, **{**plain, "max_tokens": 60}))
        results = [f.result() for f in futures]
    assert results[2].choices[0].message.content and alone
    for r in results[:2]:
        jsonschema_rs.validate(SCHEMAS[0], json.loads(r.choices[0].message.content))
    assert results[3].choices[0].message.tool_calls


def test_anthropic_tool_use(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    tool = {"name": "get_weather", "description": "Weather", "input_schema": WEATHER["function"]["parameters"]}
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    msg = client.messages.create(model=MODEL, max_tokens=80, messages=ask, tools=[tool], extra_body=GREEDY,
                                 tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert msg.stop_reason == "tool_use"
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] and use.id.startswith("toolu_")
    named = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    with client.messages.stream(model=MODEL, max_tokens=80, messages=ask, tools=[tool], extra_body=GREEDY,
                                tool_choice=named) as stream:
        final = stream.get_final_message()
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed.input == use.input
    reply = client.messages.create(model=MODEL, max_tokens=20, extra_body=GREEDY, tools=[tool], messages=ask + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}]}],
        tool_choice={"type": "none"})
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.content[0].type == "text"


def test_predicted_output_usage(oai):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Write a Python function that adds two numbers."}],
               max_tokens=48, temperature=0)
    plain = oai.chat.completions.create(**ask).choices[0].message.content
    edited = plain.replace("def ", "def  ", 1)  # a prediction that is mostly right
    r = oai.chat.completions.create(prediction={"type": "content", "content": edited}, **ask)
    assert r.choices[0].message.content  # the same as `plain` on the fp32 path (test_structured_spec_smollm2.py)
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens >= 0
