"""An admitted request counts as waiting until it is sent, however long its handler takes, and stops
counting as soon as the task that admitted it ends without sending it (its client left)."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from rtserve.client.async_llm import AdmissionRejected, AsyncLLM
from rtserve.config import EngineConfig
from rtserve.sampling_params import SamplingParams
from tests.unit.test_async_llm import ByteTokenizer, collect


async def started(make_core, max_num_waiting: int) -> AsyncLLM:
    config = EngineConfig()
    config = dataclasses.replace(config, rt=dataclasses.replace(config.rt, max_num_waiting=max_num_waiting))
    core = make_core(num_blocks=64)
    llm = AsyncLLM(config, make_core=lambda: core, tokenizer=ByteTokenizer())
    await llm.start(timeout_s=30)
    for _ in range(100):
        if llm.stats.queue is not None:
            break
        await asyncio.sleep(0.02)
    return llm


async def test_a_slow_handler_keeps_its_place_and_a_gone_one_frees_it(make_core):
    llm = await started(make_core, max_num_waiting=2)
    gate = asyncio.Event()

    async def handler(name: str) -> list:
        rt = llm.check_admission(3)
        await gate.wait()  # a handler slowed down between admission and sending
        return await collect(llm.generate([5, 6, 7], SamplingParams(max_tokens=2), name, rt=rt, admitted=True))

    try:
        slow = [asyncio.create_task(handler(f"r{i}")) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(AdmissionRejected):
            llm.check_admission(3)  # both still count, however long they take
        slow[0].cancel()  # its client left before it was sent
        await asyncio.gather(slow[0], return_exceptions=True)
        llm.check_admission(3)  # its place is free at once
        gate.set()
        outs = await asyncio.wait_for(slow[1], 30)
        assert outs[-1].finished
        assert len(llm._reserved) == 1  # the one this test's own task admitted and never sent
    finally:
        await llm.shutdown()


async def test_each_sent_request_releases_its_own_reservation(make_core):
    llm = await started(make_core, max_num_waiting=8)
    first_sent, release = asyncio.Event(), asyncio.Event()

    async def handler(name: str, send_first: bool) -> None:
        rt = llm.check_admission(3)
        if not send_first:
            await release.wait()
        agen = llm.generate([5, 6, 7], SamplingParams(max_tokens=2), name, rt=rt, admitted=True)
        first = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0)
        if send_first:
            first_sent.set()
        await first
        await collect(agen)

    try:
        early = asyncio.create_task(handler("early", send_first=False))  # admitted first, sends last
        await asyncio.sleep(0)
        late = asyncio.create_task(handler("late", send_first=True))
        await asyncio.wait_for(first_sent.wait(), 30)
        (left,) = llm._reserved
        assert left.task is early  # the request that sent released its own place, not the oldest
        release.set()
        await asyncio.wait_for(asyncio.gather(early, late), 30)
        assert not llm._reserved
    finally:
        await llm.shutdown()
