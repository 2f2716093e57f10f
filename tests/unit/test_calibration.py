"""Warm-up calibration on the tiny model: the shapes it plans, what it measures, that it leaves the
KV cache, prefix cache and scheduler as it found them, and start-up's use of the stored model."""
import asyncio
import json
import logging

import pytest

from rtserve.client.async_llm import AsyncLLM
from rtserve.config import EngineConfig
from rtserve.engine import startup
from rtserve.engine.calibration import MIN_SAMPLES, plan_pass, sequence_lengths, warm_up
from rtserve.engine.cost_model import StepFeatures
from rtserve.engine.cost_model_store import CostModelStore
from rtserve.protocol import EngineCoreRequest
from rtserve.sampling_params import SamplingParams
from tests.unit.conftest import run_to_completion
from tests.unit.test_async_llm import ByteTokenizer

PROMPT = [250, 17, 33, 91, 4, 4, 4, 180, 66, 12, 8, 199, 3, 77, 41, 9, 100, 2]


def greedy(core, prompt=PROMPT, rid="x"):
    core.add_request(EngineCoreRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=12), 0.0))
    return run_to_completion(core)[rid]


@pytest.mark.parametrize("max_num_seqs,budget,long_len", [(64, 512, 2047), (8, 16, 511), (1, 512, 2047),
                                                          (2, 64, 100), (33, 48, 300)])
def test_plan_respects_the_limits_and_computes_every_position_once_in_order(max_num_seqs, budget, long_len):
    steps = plan_pass(max_num_seqs, budget, long_len)
    written: dict[int, int] = {}
    for step in steps:
        assert sum(c.num_tokens for c in step) <= budget and len(step) <= max_num_seqs
        assert len({c.seq for c in step}) == len(step)
        for c in step:  # everything before a chunk is computed by an earlier step
            assert c.start <= written.get(c.seq, 0)
        for c in step:
            written[c.seq] = max(written.get(c.seq, 0), c.start + c.num_tokens)
    assert max(sequence_lengths(steps).values()) <= max(long_len, 128)
    decode_batches = {len(s) for s in steps if all(c.num_tokens == 1 for c in s)}
    assert {b for b in (1, 2, 4, 8, 16, 32) if b < max_num_seqs} <= decode_batches
    at_zero = {c.num_tokens for s in steps for c in s if c.start == 0}
    assert {min(n, budget, long_len) for n in (16, 32, 64, 128, 256, 512)} <= at_zero
    assert any(len(s) > 1 and any(c.num_tokens > 1 for c in s) for s in steps) == (max_num_seqs > 1)


def test_warm_up_calibrates_and_leaves_nothing_behind(make_core):
    core = make_core(num_blocks=256, budget=64, max_num_seqs=16)
    want = greedy(make_core(num_blocks=256, budget=64, max_num_seqs=16))
    kv = core.kv
    free_order = list(kv.pool._free)
    result = warm_up(core, budget_s=60.0)
    assert result.num_steps == len(result.samples) >= MIN_SAMPLES
    assert core.cost_model.is_calibrated and core.cost_model.num_samples == result.num_steps
    assert core.cost_model.overrun_ratio != 1.5  # measured: the window holds >= 32 steps
    assert core.cost_model.trusted_prefill_tokens >= 128  # chunks of the whole 64-token budget measured
    assert max(f.num_decodes for f, _ in result.samples) == 15
    assert kv.num_free_blocks == kv.pool.num_blocks and sorted(kv.pool._free) == sorted(free_order)
    assert all(b.ref_cnt == 0 and b.block_hash is None for b in kv.pool.blocks)  # no prefix-cache entry
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)
    assert not core.has_unfinished and not core.scheduler.requests
    assert greedy(core) == want  # the synthetic KV left in the blocks changes nothing


def test_warm_up_stops_at_its_budget_and_still_frees(make_core):
    core = make_core(num_blocks=256, budget=64)
    result = warm_up(core, budget_s=1e-9)
    assert result.num_steps == 0 and not core.cost_model.is_calibrated
    assert core.kv.num_free_blocks == core.kv.pool.num_blocks


def test_warm_up_refuses_a_kv_cache_too_small_and_changes_nothing(make_core):
    core = make_core(num_blocks=20, budget=64)
    with pytest.raises(RuntimeError, match="too small"):
        warm_up(core, budget_s=60.0)
    assert core.kv.num_free_blocks == 20 and core.kv.prefix_cache_queries == 0


def store(tmp_path) -> CostModelStore:
    return CostModelStore(str(tmp_path), {"model": "tiny", "backend": "test", "num_threads": 1, "cpu": "test"})


def test_start_up_measures_then_loads_the_stored_model(make_core, tmp_path, caplog):
    first = make_core(num_blocks=256, budget=64)
    with caplog.at_level(logging.INFO, logger="rtserve.engine"):
        startup.calibrate(first, store(tmp_path))
    assert first.cost_model_source == "warmup" and first.stats().cost_model_source == "warmup"
    assert "cost model: calibrated in" in caplog.text
    with open(store(tmp_path).path) as f:
        saved = json.load(f)
    assert len(saved["model"]["samples"]) == first.cost_model.num_samples >= MIN_SAMPLES

    second = make_core(num_blocks=256, budget=64)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rtserve.engine"):
        startup.calibrate(second, store(tmp_path))
    assert second.cost_model_source == "cache" and "calibrated from cache" in caplog.text
    assert second.cost_model.is_calibrated
    assert second.cost_model.num_samples <= len(saved["model"]["samples"]) + startup.NUM_CHECK_STEPS
    assert second.kv.num_free_blocks == second.kv.pool.num_blocks


def test_a_stored_model_far_off_the_measured_steps_is_measured_again(make_core, tmp_path, caplog):
    startup.calibrate(make_core(num_blocks=256, budget=64), store(tmp_path))
    with open(store(tmp_path).path) as f:
        saved = json.load(f)
    for sample in saved["model"]["samples"]:
        sample[-1] *= 100  # measured on a machine 100x slower
    with open(store(tmp_path).path, "w") as f:
        json.dump(saved, f)
    core = make_core(num_blocks=256, budget=64)
    with caplog.at_level(logging.INFO, logger="rtserve.engine"):
        startup.calibrate(core, store(tmp_path))
    assert "off this machine's steps" in caplog.text and core.cost_model_source == "warmup"
    first = saved["model"]["samples"][0]
    assert core.cost_model.predict_s(StepFeatures(*first[:-1])) < 0.1 * first[-1]  # measured again


def test_a_failed_warm_up_starts_from_the_prior(make_core, tmp_path, caplog):
    core = make_core(num_blocks=20, budget=64)  # too small for a pass
    with caplog.at_level(logging.ERROR, logger="rtserve.engine"):
        startup.calibrate(core, store(tmp_path))
    assert core.cost_model_source == "prior" and not core.cost_model.is_calibrated
    assert "calibration failed" in caplog.text


async def test_the_client_has_the_engines_stats_before_the_first_request(make_core):
    core = make_core(num_blocks=256, budget=64)
    warm_up(core, budget_s=60.0)
    core.cost_model_source = "warmup"
    llm = AsyncLLM(EngineConfig(), make_core=lambda: core, tokenizer=ByteTokenizer())
    await llm.start(timeout_s=30)
    try:
        for _ in range(100):
            if llm.stats.queue is not None:
                break
            await asyncio.sleep(0.01)
        assert llm.stats.cost_model_source == "warmup" and llm.stats.queue.cost_calibrated
    finally:
        await llm.shutdown()
