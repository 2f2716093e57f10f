"""Tool calls in the Llama 3 JSON format on a real `rtserve serve --tool-call-parser llama3_json`
(SmolLM2-135M, whose own template renders no tools: the format's generic prompt), through the openai
SDK: the grammar over the real BPE vocabulary writes calls in the format, and its parser reads them
back, whole and streamed. (One format: a server start is most of this test's time; the Mistral format
is checked without a model in tests/unit/test_structured_tool_formats.py.)"""
from __future__ import annotations

import json

import openai
import pytest

try:
    from tests.integration.fake_engine import ServerProcess
except ImportError:  # tests/integration not importable as a package
    from fake_engine import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def oai():
    with ServerProcess("--no-rt-calibrate", "--no-batch-api", "--tool-call-parser", "llama3_json") as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_calls_parse_whole_and_streamed(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                    max_tokens=60, temperature=0, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"]
    stream = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                         max_tokens=60, temperature=0, stream=True, parallel_tool_calls=False)
    arguments, finish = "", None
    for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            arguments += tc.function.arguments or ""
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    assert finish == "tool_calls" and arguments == call.function.arguments
