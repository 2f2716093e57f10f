"""/openapi.json describes every route with its request model and its family's error object; Schemathesis
fuzzes a live server (uvicorn, fake engine, real SmolLM2 tokenizer) in positive and negative modes: no 5xx,
no request past its timeout, every error body the documented OpenAI or Anthropic shape, and the server
healthy and idle afterwards. Examples per operation are bounded for CI (SCHEMA_FUZZ_EXAMPLES raises them)."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from rtserve.api.batches.settings import BatchSettings
from rtserve.client.tokenizer import Tokenizer
from tests.integration.fake_engine import FakeEngine, LiveServer, build_test_app

KEY = "fuzz-key"
JSON_BODY_EXEMPT = {"/v1/files"}  # a multipart upload (documented as a form)
NOT_FUZZED = ["/stats/stream"]    # an endless event stream: its answer never ends by design
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = FakeEngine(reply="Paris.")
    engine.tokenizer = Tokenizer.load("")
    app, _ = build_test_app(engine, api_key=KEY, batches=BatchSettings(str(tmp_path_factory.mktemp("data"))))
    with LiveServer(app) as live:
        live.engine = engine
        yield live


def get_schema(server) -> dict:
    r = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    return r.json()


def test_schema_is_behind_the_key(server):
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_every_json_route_has_its_request_model_and_error_shape(server):
    schema = get_schema(server)
    components = schema["components"]["schemas"]
    for path, item in schema["paths"].items():
        for method, op in item.items():
            error = op["responses"]["default"]["content"]["application/json"]["schema"]["$ref"]
            family = "AnthropicError" if path.startswith("/v1/messages") else "OpenAIError"
            assert error == f"#/components/schemas/{family}", path
            assert "422" not in op["responses"], path
            if method == "post" and path not in JSON_BODY_EXEMPT and not path.endswith("/cancel"):
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                model = components[ref.rsplit("/", 1)[1]]
                assert model["type"] == "object" and model["properties"], path
    chat = components["ChatCompletionRequest"]
    assert {"messages", "max_tokens", "stream", "temperature"} <= set(chat["properties"])
    assert "messages" in chat["required"]
    assert components["ChatMessage"]["properties"]["role"]["enum"][0] == "system"
    assert "max_tokens" in components["MessagesRequest"]["required"]
    upload = schema["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["file", "purpose"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis(server, mode, tmp_path):
    examples = os.environ.get("SCHEMA_FUZZ_EXAMPLES", "8")
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
           "-H", f"Authorization: Bearer {KEY}", "--mode", mode, "--max-examples", examples, "--seed", "7",
           "--checks", CHECKS, "--request-timeout", "20", "--no-color", "--workers", "1",
           *[arg for path in NOT_FUZZED for arg in ("--exclude-path", path)]]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "passed" in run.stdout and "Tested:" in run.stdout, report
    # healthy and idle after the run: answers a real request, nothing left running or waiting
    assert httpx.get(server.url + "/ready", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Par"
    assert server.engine.stats.num_running == 0 and server.engine.stats.num_waiting == 0
