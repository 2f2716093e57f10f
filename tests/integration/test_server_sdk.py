"""A real `rtserve serve` (default SmolLM2 model) driven by the official openai and anthropic SDKs and
raw httpx. One server for the module; small max_tokens keep it fast on 2 CPU cores."""
from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

try:
    from tests.integration.fake_engine import ServerProcess
except ImportError:  # tests/integration not importable as a package
    from fake_engine import ServerProcess

pytestmark = pytest.mark.slow

PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as s:
        yield s


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_health_ready_tokenize(server, model):
    data = httpx.get(server.url + "/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["owned_by"] == "rtserve"
    assert model == "SmolLM2-135M-Instruct"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready", timeout=60).json() == {"status": "ready"}
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"


def test_openai_sync_chat_paris_stream_and_not(oai, model):
    full = oai.chat.completions.create(model=model, messages=PARIS, max_tokens=16, temperature=0)
    assert "Paris" in full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 0 and full.usage.completion_tokens <= 16
    chunks = list(oai.chat.completions.create(model=model, messages=PARIS, max_tokens=16, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the second identical prompt hits the prefix cache


async def test_openai_async_completions_n_seed_and_stream(server, model):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    kwargs = dict(model=model, prompt="The sky is", max_tokens=4, temperature=1.0, seed=1234, n=2)
    first = await client.completions.create(**kwargs)
    again = await client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeds reproduce
    assert first.usage.completion_tokens == 8
    stream = await client.completions.create(model=model, prompt="The sky is", max_tokens=3, n=2, stream=True,
                                             temperature=0)
    finishes = {c.choices[0].index: c.choices[0].finish_reason async for c in stream if c.choices
                and c.choices[0].finish_reason}
    assert finishes == {0: "length", 1: "length"}
    await client.close()


def test_openai_logprobs(oai, model):
    r = oai.chat.completions.create(model=model, messages=HI, max_tokens=3, temperature=0, logprobs=True,
                                    top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(e.logprob <= 0 for e in content)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    assert content[0].token == content[0].top_logprobs[0].token  # greedy picks the most likely
    c = oai.completions.create(model=model, prompt="One, two,", max_tokens=2, temperature=0, logprobs=1)
    assert len(c.choices[0].logprobs.tokens) == 2 and "".join(c.choices[0].logprobs.tokens) == c.choices[0].text


def test_openai_errors_are_typed(oai, model):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=model, messages=HI, max_tokens=10**6)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 9000}])
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=HI)


def test_anthropic_sync(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    msg = client.messages.create(model="any", max_tokens=6, messages=HI, system="Be brief.")
    assert msg.role == "assistant" and msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.usage.output_tokens <= 6
    with client.messages.stream(model="any", max_tokens=6, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Say hi.", "cache_control": {"type": "ephemeral"}}]}],
            system=[{"type": "text", "text": "Be brief."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text
    u = final.usage
    assert u.cache_read_input_tokens > 0  # the system prompt prefix was cached by the first call
    assert u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens == msg.usage.input_tokens + (
        msg.usage.cache_read_input_tokens or 0)
    assert client.messages.count_tokens(model="any", messages=HI, system="Be brief.").input_tokens == (
        msg.usage.input_tokens + msg.usage.cache_read_input_tokens)


async def test_anthropic_async_stream(server):
    client = anthropic.AsyncAnthropic(base_url=server.url, api_key="unused", max_retries=0)
    types = []
    async with client.messages.stream(model="any", max_tokens=5, messages=HI) as stream:
        async for event in stream:
            types.append(event.type)
        final = await stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert final.usage.output_tokens == 5 or final.stop_reason == "end_turn"
    await client.close()


def test_raw_sse_bytes(server, model):
    body = {"model": model, "messages": HI, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    assert b"\r" not in raw and raw.endswith(b"\n\ndata: [DONE]\n\n")
    frames = raw[:-2].split(b"\n\n")
    assert all(f.startswith(b"data: ") for f in frames)
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])


def test_metrics_after_traffic(server, model):
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_sum", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total"):
        assert f'{name}{{' in text, name
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples[f'vllm:generation_tokens_total{{model_name="{model}"}}']) > 0
    assert float(samples[f'vllm:prefix_cache_hits_total{{model_name="{model}"}}']) > 0
    assert float(samples[f'vllm:num_requests_running{{model_name="{model}"}}']) == 0
