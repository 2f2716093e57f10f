"""AsyncLLM on the tiny model with the engine core on a thread: streaming, abort, validation, death."""
import asyncio

import pytest

from rtserve.client.async_llm import AsyncLLM, EngineDeadError
from rtserve.config import EngineConfig
from rtserve.engine.validation import InvalidRequest
from rtserve.sampling_params import SamplingParams


class ByteTokenizer:
    """Each id < 256 is one byte (latin-1), enough to drive the output processor."""

    vocab_size = 256
    bos_token_id = 1
    eos_token_id = None
    eos_token_ids = ()
    special_token_ids = frozenset()

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("latin-1"))

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("latin-1")


@pytest.fixture
async def client(make_core):
    core = make_core(num_blocks=64)
    llm = AsyncLLM(EngineConfig(), make_core=lambda: core, tokenizer=ByteTokenizer())
    await llm.start(timeout_s=30)
    yield llm, core
    await llm.shutdown()


async def collect(agen):
    return [out async for out in agen]


async def test_streams_deltas_and_finishes(client):
    llm, core = client
    outs = await collect(llm.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6), "a"))
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert sum(len(o.token_ids) for o in outs) == 6
    assert outs[-1].num_output_tokens == 6 and outs[-1].num_prompt_tokens == 4
    assert llm.max_model_len == 512


async def test_concurrent_requests_and_consumer_break_aborts(client):
    llm, core = client
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def take_two(rid):
        n = 0
        async for _ in llm.generate([9, 10, 11], params, rid):
            n += 1
            if n == 2:
                break
        return n

    full = asyncio.create_task(collect(llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=8), "f")))
    assert await asyncio.gather(take_two("b1"), take_two("b2")) == [2, 2]
    assert (await full)[-1].finish_reason == "length"
    for _ in range(100):  # the abort reaches the engine within a step or two
        if not core.has_unfinished and core.kv.num_free_blocks == core.kv.pool.num_blocks:
            break
        await asyncio.sleep(0.02)
    assert core.kv.num_free_blocks == core.kv.pool.num_blocks
    assert llm.stats.kv_usage == 0.0


async def test_cancelled_task_aborts_request(client):
    llm, core = client

    async def consume():
        async for _ in llm.generate([4, 4, 4], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True), "c"):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if not core.has_unfinished:
            break
        await asyncio.sleep(0.02)
    assert not core.has_unfinished and core.kv.num_free_blocks == core.kv.pool.num_blocks


async def test_stop_string_ends_request_and_frees_engine(client):
    llm, core = client
    first = await collect(llm.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=10), "probe"))
    text = "".join(o.text for o in first)
    stop = text[3:5]
    outs = await collect(llm.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=10, stop=[stop]), "s"))
    assert "".join(o.text for o in outs) == text[:text.index(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    for _ in range(100):
        if not core.has_unfinished:
            break
        await asyncio.sleep(0.02)
    assert core.kv.num_free_blocks == core.kv.pool.num_blocks


async def test_validation_errors_before_any_output(client):
    llm, _ = client
    with pytest.raises(InvalidRequest) as err:
        await collect(llm.generate([], SamplingParams(), "e1"))
    assert err.value.param == "prompt"
    with pytest.raises(ValueError) as err:
        await collect(llm.generate([1, 2], SamplingParams(max_tokens=10_000), "e2"))
    assert err.value.param == "max_tokens"


async def test_engine_death_fails_inflight_requests_loudly(make_core):
    core = make_core()

    def crash(sched):
        raise SystemExit("engine loop killed")  # not an Exception: escapes the step's fault handler

    core.runner.execute = crash
    llm = AsyncLLM(EngineConfig(), make_core=lambda: core, tokenizer=ByteTokenizer())
    await llm.start(timeout_s=30)
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(collect(llm.generate([1, 2, 3], SamplingParams(max_tokens=4), "d")), 10)
    assert llm.is_dead
    with pytest.raises(EngineDeadError):
        await collect(llm.generate([1, 2, 3], SamplingParams(max_tokens=4), "d2"))
    await llm.shutdown()
