"""Faults injected into a real engine core (tiny model, core on a thread) behind the real app: a forward
that raises after N good steps fails only that step's requests; a fault that kills the loop fails every
waiting client, turns /health 503 and refuses new requests at once; abort_all ends every stream."""
from __future__ import annotations

import asyncio
import json

import pytest

from rtserve.api.app import ServerSettings, build_app
from rtserve.client.async_llm import AsyncLLM
from rtserve.config import EngineConfig
from rtserve.protocol import FinishReason
from rtserve.sampling_params import SamplingParams
from tests.integration.fake_engine import asgi_client
from tests.unit.test_async_llm import ByteTokenizer, collect

GOOD_STEPS = 3


def fail_after(core, num_good_steps: int, exc: BaseException) -> None:
    """Make the core's forward raise `exc` once `num_good_steps` steps went well (vLLM's forward-error test)."""
    execute, calls = core.runner.execute, [0]

    def faulty(sched):
        calls[0] += 1
        if calls[0] > num_good_steps:
            raise exc
        return execute(sched)

    core.runner.execute = faulty


@pytest.fixture
async def served(make_core):
    async def serve(exc: BaseException):
        core = make_core(num_blocks=64)
        fail_after(core, GOOD_STEPS, exc)
        llm = AsyncLLM(EngineConfig(), make_core=lambda: core, tokenizer=ByteTokenizer())
        await llm.start(timeout_s=30)
        app = build_app(llm, ServerSettings(manage_engine_lifecycle=False))
        started.append(llm)
        return llm, app

    started: list[AsyncLLM] = []
    yield serve
    for llm in started:
        await llm.shutdown()


def body(max_tokens: int, stream: bool) -> dict:
    return {"prompt": [5, 6, 7], "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}


async def sse_payloads(client, request: dict) -> list:
    r = await client.post("/v1/completions", json=request, timeout=30)
    assert r.status_code == 200
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in r.text.splitlines() if line.startswith("data: ")]


async def test_forward_fault_fails_that_step_only(served):
    llm, app = await served(RuntimeError("simulated illegal memory access"))
    async with asgi_client(app) as client:
        streamed = await sse_payloads(client, body(20, True))
        assert streamed[-1] == "[DONE]" and streamed[-2]["error"]["code"] == "engine_error"
        assert "simulated illegal memory access" in streamed[-2]["error"]["message"]
        r = await client.post("/v1/completions", json=body(20, False))
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert not llm.is_dead and (await client.get("/health")).status_code == 200


async def test_loop_fault_fails_every_waiter_and_health(served):
    llm, app = await served(SystemExit("engine loop killed"))  # not an Exception: escapes the step handler
    async with asgi_client(app) as client:
        results = await asyncio.wait_for(asyncio.gather(
            *(sse_payloads(client, body(50, True)) for _ in range(3)),
            client.post("/v1/completions", json=body(50, False))), 30)
        for streamed in results[:3]:
            assert streamed[-1] == "[DONE]" and streamed[-2]["error"]["code"] == "engine_dead"
        assert results[3].status_code == 503 and results[3].json()["error"]["code"] == "engine_dead"
        assert llm.is_dead and (await client.get("/health")).status_code == 503
        r = await client.post("/v1/completions", json=body(2, False))
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


async def test_abort_all_ends_every_stream_with_abort(make_core):
    core = make_core(num_blocks=64)
    llm = AsyncLLM(EngineConfig(), make_core=lambda: core, tokenizer=ByteTokenizer())
    await llm.start(timeout_s=30)
    try:
        params = SamplingParams(max_tokens=40, ignore_eos=True)

        async def run(rid: str):
            outs = []
            async for out in llm.generate([5, 6, 7], params, rid):
                outs.append(out)
                if len(outs) == 1:
                    first.set()
            return outs

        first = asyncio.Event()
        tasks = [asyncio.create_task(run(f"r{i}")) for i in range(2)]
        await asyncio.wait_for(first.wait(), 30)
        assert sorted(llm.abort_all("shutting down")) == ["r0", "r1"]
        for outs in await asyncio.wait_for(asyncio.gather(*tasks), 10):
            assert outs[-1].finished and outs[-1].finish_reason == FinishReason.ABORT
        assert llm.num_requests == 0
        for _ in range(100):
            if not core.has_unfinished:
                break
            await asyncio.sleep(0.02)
        assert core.kv.num_free_blocks == core.kv.pool.num_blocks
    finally:
        await llm.shutdown()


class ChatByteTokenizer(ByteTokenizer):
    def encode_chat(self, messages, add_generation_prompt=True):
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))


async def test_abort_all_ends_anthropic_streams_with_an_error_event(make_core):
    core = make_core(num_blocks=64)
    llm = AsyncLLM(EngineConfig(), make_core=lambda: core, tokenizer=ChatByteTokenizer())
    await llm.start(timeout_s=30)
    app = build_app(llm, ServerSettings(manage_engine_lifecycle=False))
    try:
        async with asgi_client(app) as client:
            async def stream() -> list[str]:
                body = {"model": "m", "max_tokens": 60, "stream": True, "ignore_eos": True,
                        "messages": [{"role": "user", "content": "hi"}]}
                async with client.stream("POST", "/v1/messages", json=body) as r:
                    return [line async for line in r.aiter_lines() if line]

            task = asyncio.create_task(stream())
            while not llm.num_requests or not core.has_unfinished:
                await asyncio.sleep(0.01)
            assert len(llm.abort_all("the server is shutting down")) == 1
            lines = await asyncio.wait_for(task, 10)
        assert lines[-2] == "event: error"
        assert json.loads(lines[-1][len("data: "):]) == {"type": "error", "error": {
            "type": "api_error", "message": "The response was cut short: the server is shutting down."}}
    finally:
        await llm.shutdown()
