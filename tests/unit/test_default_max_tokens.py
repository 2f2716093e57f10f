"""A request without max_tokens stops at the server's --max-tokens-cap (not at the end of the context)."""
from __future__ import annotations

import dataclasses

from rtserve.client.async_llm import AsyncLLM
from rtserve.config import EngineConfig, LimitsConfig
from rtserve.protocol import FinishReason
from rtserve.sampling_params import SamplingParams
from tests.unit.test_async_llm import ByteTokenizer, collect


async def test_no_max_tokens_means_the_cap(make_core):
    core = make_core(num_blocks=64)
    config = dataclasses.replace(EngineConfig(), limits=LimitsConfig(max_tokens_cap=5))
    llm = AsyncLLM(config, make_core=lambda: core, tokenizer=ByteTokenizer())
    await llm.start(timeout_s=30)
    try:
        outs = await collect(llm.generate([5, 6, 7], SamplingParams(max_tokens=None, ignore_eos=True), "r"))
        assert outs[-1].finish_reason == FinishReason.LENGTH and outs[-1].num_output_tokens == 5
        room = llm.max_model_len - 3
        assert llm._bounded([5, 6, 7], SamplingParams(max_tokens=None)).max_tokens == min(5, room)
        assert llm._bounded([5, 6, 7], SamplingParams(max_tokens=3)).max_tokens == 3
    finally:
        await llm.shutdown()
