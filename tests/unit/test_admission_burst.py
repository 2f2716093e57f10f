"""The bounded waiting queue holds under a burst: a request counts as waiting from its admission, before
it reaches generate(), and an admitted request that is never sent stops counting after a short while."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

import rtserve.client.async_llm as async_llm_module
from rtserve.client.async_llm import AdmissionRejected, AsyncLLM
from rtserve.config import EngineConfig
from rtserve.sampling_params import SamplingParams
from tests.unit.test_async_llm import ByteTokenizer, collect


async def test_a_burst_of_admissions_sees_itself(make_core, monkeypatch):
    config = EngineConfig()
    config = dataclasses.replace(config, rt=dataclasses.replace(config.rt, max_num_waiting=3))
    core = make_core(num_blocks=64)
    llm = AsyncLLM(config, make_core=lambda: core, tokenizer=ByteTokenizer())
    await llm.start(timeout_s=30)
    try:
        for _ in range(100):
            if llm.stats.queue is not None:
                break
            await asyncio.sleep(0.02)
        admitted = [llm.check_admission(3) for _ in range(3)]  # a burst: nothing sent yet
        with pytest.raises(AdmissionRejected) as refused:
            llm.check_admission(3)
        assert refused.value.reason == "queue_full"
        # the admitted ones are sent: each stops being a reservation and is pending until it runs
        outs = await asyncio.gather(*(collect(llm.generate([5, 6, 7], SamplingParams(max_tokens=2), f"r{i}",
                                                            rt=rt, admitted=True)) for i, rt in enumerate(admitted)))
        assert all(o[-1].finished for o in outs) and not llm._reserved
        monkeypatch.setattr(async_llm_module, "_RESERVATION_TTL_S", 0.05)
        for _ in range(3):
            llm.check_admission(3)  # admitted, then its client leaves before sending
        await asyncio.sleep(0.1)
        llm.check_admission(3)  # the abandoned reservations expired
    finally:
        await llm.shutdown()
