"""A batch running on the tiny model (real engine core on a thread, deadline policy) beside interactive
requests: items run as the `batch` class and never more than --batch-max-in-flight at once, and the firm
and soft requests sent meanwhile are neither refused, preempted nor dropped, read off the engine's own
per-class counters (rtserve/api/rt_metrics.py) rather than wall-clock thresholds."""
from __future__ import annotations

import asyncio
import json

import pytest

from rtserve.api.app import ServerSettings, build_app
from rtserve.api.batches.settings import BatchSettings
from rtserve.client.async_llm import AsyncLLM
from rtserve.config import EngineConfig
from tests.integration.fake_engine import asgi_client
from tests.unit.test_async_llm import ByteTokenizer

NUM_ITEMS, MAX_IN_FLIGHT = 16, 3


def completion(prompt: list[int], **extra) -> dict:
    return {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **extra}


@pytest.fixture
async def served(make_core, tmp_path):
    core = make_core(num_blocks=128, block_size=4, budget=32, max_num_seqs=8)
    llm = AsyncLLM(EngineConfig(), make_core=lambda: core, tokenizer=ByteTokenizer())
    await llm.start(timeout_s=30)
    app = build_app(llm, ServerSettings(manage_engine_lifecycle=False,
                                        batches=BatchSettings(str(tmp_path), max_in_flight=MAX_IN_FLIGHT,
                                                              sweep_interval_s=0.05)))
    async with app.router.lifespan_context(app), asgi_client(app, timeout=120) as client:
        yield client, app, llm
    await llm.shutdown()


async def test_batch_beside_interactive_traffic(served):
    client, app, llm = served
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
              "body": completion([10 + i, 11, 12, 13, 14, 15, 16, 17])} for i in range(NUM_ITEMS)]
    content = "\n".join(json.dumps(x) for x in lines).encode()
    file_id = (await client.post("/v1/files", files={"file": ("b.jsonl", content)},
                                 data={"purpose": "batch"})).json()["id"]
    batch = (await client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                    "completion_window": "24h"})).json()
    max_batch_seen = 0

    async def watch() -> None:
        nonlocal max_batch_seen
        while True:
            stats = llm.stats
            max_batch_seen = max(max_batch_seen, stats.num_running + stats.num_waiting)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    for _ in range(6000):  # send the interactive requests once batch items are in the engine
        if llm.stats.num_running + llm.stats.num_waiting > 0:
            break
        await asyncio.sleep(0.005)
    budgets = {"ttft_ms": 60_000, "itl_ms": 30_000}  # generous: the counters, not the clock, are the test
    interactive = [client.post("/v1/completions", json=completion([40 + i, 41, 42], rt={"class": cls, **budgets}))
                   for i, cls in enumerate(["firm", "soft", "firm", "soft"])]
    answers = await asyncio.gather(*interactive)
    for _ in range(6000):
        done = (await client.get(f"/v1/batches/{batch['id']}")).json()
        if done["status"] == "completed":
            break
        await asyncio.sleep(0.02)
    watcher.cancel()
    assert done["status"] == "completed" and done["request_counts"]["completed"] == NUM_ITEMS
    assert all(a.status_code == 200 and a.json()["rt"]["deadline_met"] for a in answers)
    assert max_batch_seen <= MAX_IN_FLIGHT + len(interactive)  # the batch never floods the engine's queues
    rt = app.state.rtserve.metrics.rt.classes
    assert rt["batch"].num_finished == NUM_ITEMS
    for cls in ("firm", "soft"):
        assert rt[cls].num_finished == 2
        assert sum(rt[cls].rejections.values()) == 0 and rt[cls].num_expired == 0
        assert rt[cls].num_preemptions == 0 and sum(rt[cls].misses.values()) == 0
